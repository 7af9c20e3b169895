"""What a worker's way to its registration must not import (it is paid on every cold start).

Checked in a fresh interpreter, since this test process has imported everything already:
encoding a registration (with a map field) and an endpoint config must not import
``descriptor_pb2`` (reading descriptor options does, ~50 ms), and opening a store and listing
its snapshots and refs must not import ``filelock`` (~30 ms); taking a store lock still does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHECK = """
import json, sys
from pathlib import Path

from gen_worker.models.store import Store
from gen_worker.protocol import messages as m
from gen_worker.protocol.convert import scheduler_from_pb, scheduler_to_pb, worker_to_pb

host = m.HostInfo(cpu_count=2, libraries={"msgspec": "0.19"})
registration = m.WorkerRegistration(worker_id="w", host=host)
encoded = worker_to_pb(registration)
config = m.EndpointConfig(release_id="r", keyspaces={"f": m.Keyspace(models={"k": "a/b:c"})})
decoded = scheduler_from_pb(scheduler_to_pb(config))
after_protocol = "google.protobuf.descriptor_pb2" in sys.modules

store = Store(Path(sys.argv[1]))
listed = (store.refs(), store.inventory())
after_store = "filelock" in sys.modules
store.set_ref("acme/model:v1", "blake3:" + "0" * 64)  # written under the refs guard
after_lock = "filelock" in sys.modules
print(json.dumps({
    "protocol": after_protocol,
    "store": after_store,
    "lock": after_lock,
    "keyspaces": decoded.keyspaces["f"].models,
    "encoded": len(encoded),
}))
"""


def test_the_registration_path_imports_neither_descriptor_pb2_nor_filelock(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["keyspaces"] == {"k": "a/b:c"}  # the map round trip still works
    assert seen["encoded"] > 0
    assert seen["protocol"] is False, "encoding the registration imported descriptor_pb2"
    assert seen["store"] is False, "opening and listing a store imported filelock"
    assert seen["lock"] is True  # a guard still takes its file lock when it is used
