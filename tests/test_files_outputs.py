"""Tests for output refs, the local output sink and find_assets (gen_worker.files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import blake3
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gen_worker.authoring import Asset, OutputSink, Tensors
from gen_worker.errors import OutputTooLargeError, ValidationError
from gen_worker.files import LocalOutputSink, LocalOutputStream, find_assets, output_ref

RID = "req-1"


def _files(root: Path) -> list[str]:
    """Every file under root (hidden ones too), relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".partial")]


def _check_digests(asset: Asset | Tensors, data: bytes) -> None:
    assert asset.size_bytes == len(data)
    assert asset.sha256 == hashlib.sha256(data).hexdigest()
    assert asset.blake3 == blake3.blake3(data).hexdigest()


# --- output_ref ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("image.png", f"jobs/{RID}/outputs/image.png"),
        ("frames/0001.png", f"jobs/{RID}/outputs/frames/0001.png"),
        (f"jobs/{RID}/outputs/image.png", f"jobs/{RID}/outputs/image.png"),
        (f"jobs/{RID}/outputs/a/b/c.txt", f"jobs/{RID}/outputs/a/b/c.txt"),
        ("jobs", f"jobs/{RID}/outputs/jobs"),
        ("...", f"jobs/{RID}/outputs/..."),
        (".hidden", f"jobs/{RID}/outputs/.hidden"),
        ("ünïcode é.png", f"jobs/{RID}/outputs/ünïcode é.png"),
    ],
)
def test_output_ref_accepts(ref: str, expected: str) -> None:
    assert output_ref(ref, RID) == expected


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("", "it is empty"),
        ("/etc/passwd", "it is an absolute path"),
        (f"/jobs/{RID}/outputs/a.png", "it is an absolute path"),
        ("../a.png", "'..' segment"),
        ("a/../b.png", "'..' segment"),
        (f"jobs/{RID}/outputs/../../x", "'..' segment"),
        ("./a.png", "'.' segment"),
        ("a/./b.png", "'.' segment"),
        ("a\\b.png", "backslash"),
        ("..\\..\\x", "backslash"),
        ("a//b.png", "empty segment"),
        ("a/", "empty segment"),
        ("a\x00b", "NUL"),
        ("a\nb", "control character"),
        ("\udc80.png", "lone surrogate"),
        ("x" * 256, "longer than 255 bytes"),
        ("a/" * 600, "longer than 1024"),
        ("jobs/other/outputs/a.png", "another request's namespace"),
        ("jobs/x.png", "another request's namespace"),
        (f"jobs/{RID}", f"only jobs/{RID}/outputs/ is writable"),
        (f"jobs/{RID}/inputs/a.png", f"only jobs/{RID}/outputs/ is writable"),
        (f"jobs/{RID}/outputs", "output name after 'outputs/' is empty"),
    ],
)
def test_output_ref_refuses(ref: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        output_ref(ref, RID)
    message = str(info.value)
    assert reason in message
    assert "output ref" in message
    assert "jobs/<request_id>/outputs/<name>" in message  # says what is valid
    if len(ref) <= 200:
        assert repr(ref) in message  # names the ref


def test_output_ref_message_is_bounded_for_huge_refs() -> None:
    with pytest.raises(ValidationError) as info:
        output_ref("x" * 100_000, RID)
    assert len(str(info.value)) < 600


@pytest.mark.parametrize("request_id", ["", "a/b", "..", ".", "a\\b", "a\x00"])
def test_output_ref_refuses_unsafe_request_ids(request_id: str) -> None:
    with pytest.raises(ValidationError, match="request id"):
        output_ref("image.png", request_id)


def test_output_ref_refuses_non_strings() -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        output_ref(b"image.png", RID)  # type: ignore[arg-type]


@given(ref=st.text(), request_id=st.sampled_from([RID, "r", "0b2f-77"]))
def test_output_ref_is_safe_for_any_text(ref: str, request_id: str) -> None:
    try:
        full = output_ref(ref, request_id)
    except ValidationError:
        return
    assert full.startswith(f"jobs/{request_id}/outputs/")
    parts = full.split("/")
    assert ".." not in parts
    assert "." not in parts
    assert "" not in parts
    assert len(parts) >= 4


@given(ref=st.text(alphabet="ab./\\\x00 ", max_size=12))
def test_output_ref_is_safe_for_path_like_text(ref: str) -> None:
    # A small alphabet of path characters hits the interesting cases far more often.
    try:
        full = output_ref(ref, RID)
    except ValidationError:
        return
    assert full.startswith(f"jobs/{RID}/outputs/")
    assert ".." not in full.split("/")
    assert "\\" not in full
    assert "\x00" not in full


# --- LocalOutputSink ------------------------------------------------------------------------


@pytest.fixture
def sink(tmp_path: Path) -> LocalOutputSink:
    return LocalOutputSink(tmp_path / "out", RID)


def test_sink_is_an_output_sink(sink: LocalOutputSink) -> None:
    as_protocol: OutputSink = sink  # mypy checks this structurally
    assert as_protocol is sink


def test_save_bytes_writes_file_with_digests(tmp_path: Path, sink: LocalOutputSink) -> None:
    data = b"\x89PNG fake image" * 1000
    asset = sink.save_bytes("image.png", data)
    final = tmp_path / "out" / "jobs" / RID / "outputs" / "image.png"
    assert final.read_bytes() == data
    assert asset.ref == f"jobs/{RID}/outputs/image.png"
    assert asset.local_path == str(final.resolve())
    assert Path(asset.local_path).is_absolute()
    assert asset.mime_type == "image/png"
    assert asset.url is None
    _check_digests(asset, data)
    assert sink.saved == [asset]
    assert _partials(tmp_path) == []


def test_save_bytes_nested_ref_and_default_mime(tmp_path: Path, sink: LocalOutputSink) -> None:
    asset = sink.save_bytes(f"jobs/{RID}/outputs/a/b/blob.unknownext", b"xyz")
    final = tmp_path / "out" / "jobs" / RID / "outputs" / "a" / "b" / "blob.unknownext"
    assert final.read_bytes() == b"xyz"
    assert asset.mime_type == "application/octet-stream"
    assert sink.save_bytes("notes.txt", b"").mime_type == "text/plain"


def test_save_bytes_empty(sink: LocalOutputSink) -> None:
    asset = sink.save_bytes("empty.bin", b"")
    _check_digests(asset, b"")
    assert Path(str(asset.local_path)).read_bytes() == b""


def test_resave_replaces_the_file(sink: LocalOutputSink) -> None:
    first = sink.save_bytes("x.txt", b"first version")
    second = sink.save_bytes("x.txt", b"second")
    assert first.local_path == second.local_path
    assert Path(str(second.local_path)).read_bytes() == b"second"
    _check_digests(second, b"second")
    assert [a.sha256 for a in sink.saved] == [first.sha256, second.sha256]


def test_save_bytes_refuses_bad_ref_and_writes_nothing(tmp_path: Path) -> None:
    sink = LocalOutputSink(tmp_path / "out", RID)
    with pytest.raises(ValidationError, match="another request's namespace"):
        sink.save_bytes("jobs/other/outputs/x.png", b"data")
    assert not (tmp_path / "out").exists() or _files(tmp_path / "out") == []
    assert sink.saved == []


def test_sink_refuses_unsafe_request_id(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="request id"):
        LocalOutputSink(tmp_path, "../escape")


def test_save_file_streams_a_file(tmp_path: Path, sink: LocalOutputSink) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks
    source = tmp_path / "src.mp4"
    source.write_bytes(data)
    asset = sink.save_file("video.mp4", source)
    assert Path(str(asset.local_path)).read_bytes() == data
    assert asset.mime_type == "video/mp4"
    _check_digests(asset, data)
    assert source.read_bytes() == data  # the source is left alone
    assert _partials(tmp_path) == []


def test_save_file_missing_source_is_validation_error(tmp_path: Path) -> None:
    sink = LocalOutputSink(tmp_path / "out", RID)
    missing = tmp_path / "nope.png"
    with pytest.raises(ValidationError) as info:
        sink.save_file("x.png", missing)
    assert str(info.value) == f"cannot save output from {missing}: it does not exist"
    with pytest.raises(ValidationError, match="not a regular file"):
        sink.save_file("x.png", tmp_path)
    assert sink.saved == []


def test_open_stream_writes_incrementally(tmp_path: Path, sink: LocalOutputSink) -> None:
    stream = sink.open_stream("frames/all.bin")
    assert isinstance(stream, LocalOutputStream)
    final = tmp_path / "out" / "jobs" / RID / "outputs" / "frames" / "all.bin"
    assert stream.write(b"abc") == 3
    assert stream.write(b"defg") == 4
    assert not final.exists()  # nothing visible before finalize
    assert len(_partials(tmp_path)) == 1
    assert _partials(tmp_path)[0].name.startswith(".")
    asset = stream.finalize()
    assert final.read_bytes() == b"abcdefg"
    _check_digests(asset, b"abcdefg")
    assert sink.saved == [asset]
    assert _partials(tmp_path) == []


def test_stream_finalize_twice_raises(sink: LocalOutputSink) -> None:
    stream = sink.open_stream("a.txt")
    stream.write(b"x")
    stream.finalize()
    with pytest.raises(ValueError, match="already finalized"):
        stream.finalize()
    with pytest.raises(ValueError, match="already finalized"):
        stream.write(b"more")
    stream.abort()  # a no-op once finalized: the output stays
    assert len(sink.saved) == 1
    assert Path(str(sink.saved[0].local_path)).read_bytes() == b"x"


def test_stream_abort_leaves_nothing(tmp_path: Path, sink: LocalOutputSink) -> None:
    stream = sink.open_stream("a.txt")
    stream.write(b"partial data")
    stream.abort()
    stream.abort()
    assert _files(tmp_path / "out") == []
    with pytest.raises(ValueError, match="aborted"):
        stream.finalize()
    assert sink.saved == []


def test_stream_context_manager_finalizes(tmp_path: Path, sink: LocalOutputSink) -> None:
    with sink.open_stream("ctx.txt") as stream:
        stream.write(b"hello")
    assert (tmp_path / "out" / "jobs" / RID / "outputs" / "ctx.txt").read_bytes() == b"hello"
    assert len(sink.saved) == 1
    _check_digests(sink.saved[0], b"hello")


def test_stream_context_manager_after_explicit_finalize(sink: LocalOutputSink) -> None:
    with sink.open_stream("ctx.txt") as stream:
        stream.write(b"hello")
        asset = stream.finalize()
    assert sink.saved == [asset]


def test_stream_context_manager_aborts_on_error(tmp_path: Path, sink: LocalOutputSink) -> None:
    final = tmp_path / "out" / "jobs" / RID / "outputs" / "ctx.txt"
    with pytest.raises(RuntimeError, match="boom"), sink.open_stream("ctx.txt") as stream:
        stream.write(b"half of it")
        raise RuntimeError("boom")
    assert not final.exists()
    assert _files(tmp_path / "out") == []
    assert sink.saved == []


def test_stream_failure_keeps_previous_version(tmp_path: Path, sink: LocalOutputSink) -> None:
    sink.save_bytes("ctx.txt", b"old")
    with pytest.raises(RuntimeError), sink.open_stream("ctx.txt") as stream:
        stream.write(b"new but broken")
        raise RuntimeError("boom")
    final = tmp_path / "out" / "jobs" / RID / "outputs" / "ctx.txt"
    assert final.read_bytes() == b"old"
    assert _partials(tmp_path) == []


def test_checkpoint_from_file_and_bytes(tmp_path: Path, sink: LocalOutputSink) -> None:
    data = b"safetensors header and weights" * 100
    source = tmp_path / "model.safetensors"
    source.write_bytes(data)
    tensors = sink.save_checkpoint("ckpt/model.safetensors", source, "safetensors")
    assert isinstance(tensors, Tensors)
    assert tensors.ref == f"jobs/{RID}/outputs/ckpt/model.safetensors"
    assert tensors.format == "safetensors"
    _check_digests(tensors, data)
    final = tmp_path / "out" / "jobs" / RID / "outputs" / "ckpt" / "model.safetensors"
    assert final.read_bytes() == data
    from_bytes = sink.save_checkpoint_bytes("ckpt/b.gguf", b"gguf!", "gguf")
    assert from_bytes.format == "gguf"
    _check_digests(from_bytes, b"gguf!")
    assert (final.parent / "b.gguf").read_bytes() == b"gguf!"
    with pytest.raises(ValidationError, match="format"):
        sink.save_checkpoint_bytes("ckpt/c.bin", b"x", "")


# --- limits and failures ----------------------------------------------------------------------


def test_max_upload_bytes_for_bytes(tmp_path: Path) -> None:
    sink = LocalOutputSink(tmp_path / "out", RID, max_upload_bytes=10)
    assert sink.save_bytes("ok.bin", b"0123456789").size_bytes == 10  # the limit itself is fine
    with pytest.raises(OutputTooLargeError) as info:
        sink.save_bytes("big.bin", b"0123456789X")
    assert (info.value.size_bytes, info.value.max_bytes) == (11, 10)
    with pytest.raises(OutputTooLargeError):
        sink.save_checkpoint_bytes("big.safetensors", b"x" * 11, "safetensors")
    assert _files(tmp_path / "out") == [f"jobs/{RID}/outputs/ok.bin"]
    assert len(sink.saved) == 1


def test_max_upload_bytes_for_file(tmp_path: Path) -> None:
    sink = LocalOutputSink(tmp_path / "out", RID, max_upload_bytes=1000)
    source = tmp_path / "big.bin"
    source.write_bytes(b"y" * 1001)
    with pytest.raises(OutputTooLargeError) as info:
        sink.save_file("big.bin", source)
    assert info.value.size_bytes == 1001
    with pytest.raises(OutputTooLargeError):
        sink.save_checkpoint("big.safetensors", source, "safetensors")
    assert not (tmp_path / "out").exists()  # refused from its size before anything was made
    assert sink.saved == []


def test_max_upload_bytes_for_stream(tmp_path: Path) -> None:
    sink = LocalOutputSink(tmp_path / "out", RID, max_upload_bytes=8)
    stream = sink.open_stream("s.bin")
    stream.write(b"12345")
    with pytest.raises(OutputTooLargeError) as info:
        stream.write(b"6789")
    assert (info.value.size_bytes, info.value.max_bytes) == (9, 8)
    assert _files(tmp_path / "out") == []  # the partial file is gone at once
    with pytest.raises(ValueError, match="aborted"):
        stream.write(b"x")
    stream.abort()
    assert sink.saved == []


def test_max_upload_bytes_in_stream_context_manager(tmp_path: Path) -> None:
    sink = LocalOutputSink(tmp_path / "out", RID, max_upload_bytes=4)
    with pytest.raises(OutputTooLargeError), sink.open_stream("s.bin") as stream:
        stream.write(b"12345")
    assert _files(tmp_path / "out") == []


def test_failed_commit_leaves_no_partial(tmp_path: Path, sink: LocalOutputSink) -> None:
    sink.save_bytes("dir/inner.txt", b"x")  # now "dir" is a directory of outputs
    with pytest.raises(ValidationError, match="directory"):
        sink.save_bytes("dir", b"cannot replace a directory")
    with pytest.raises(ValidationError, match="directory"), sink.open_stream("dir") as stream:
        stream.write(b"nor by streaming")
    assert _partials(tmp_path) == []
    assert _files(tmp_path / "out") == [f"jobs/{RID}/outputs/dir/inner.txt"]


def test_parent_that_is_a_file_is_validation_error(sink: LocalOutputSink) -> None:
    sink.save_bytes("a", b"file")
    with pytest.raises(ValidationError, match="parent is a file"):
        sink.save_bytes("a/b.png", b"data")


def test_symlink_escape_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "jobs" / RID / "outputs").mkdir(parents=True)
    (root / "jobs" / RID / "outputs" / "link").symlink_to(outside, target_is_directory=True)
    sink = LocalOutputSink(root, RID)
    with pytest.raises(ValidationError, match="outside the output directory"):
        sink.save_bytes("link/evil.txt", b"pwned")
    with pytest.raises(ValidationError, match="outside the output directory"):
        sink.open_stream("link/deeper/evil.txt")
    assert list(outside.iterdir()) == []  # not even a directory was created out there


def test_symlink_at_top_of_tree_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "jobs").symlink_to(outside, target_is_directory=True)
    sink = LocalOutputSink(root, RID)
    with pytest.raises(ValidationError, match="symlink"):
        sink.save_bytes("x.png", b"data")
    assert list(outside.iterdir()) == []


def test_symlink_inside_root_is_allowed(tmp_path: Path) -> None:
    root = tmp_path / "out"
    (root / "store").mkdir(parents=True)
    (root / "jobs" / RID).mkdir(parents=True)
    (root / "jobs" / RID / "outputs").symlink_to(root / "store", target_is_directory=True)
    asset = LocalOutputSink(root, RID).save_bytes("x.txt", b"inside")
    assert (root / "store" / "x.txt").read_bytes() == b"inside"
    assert asset.local_path == str((root / "store" / "x.txt").resolve())


# --- find_assets --------------------------------------------------------------------------------


class Inner(msgspec.Struct):
    image: Asset
    note: str = ""


class Outer(msgspec.Struct):
    first: Asset | None
    inners: list[Inner]
    by_name: dict[str, Asset]
    pair: tuple[Asset, int]
    count: int = 0


def test_find_assets_nested_depth_first() -> None:
    a, b, c, d, e = (Asset(ref=f"r{i}") for i in range(5))
    value = Outer(
        first=a,
        inners=[Inner(image=b), Inner(image=c, note="x")],
        by_name={"k": d, "j": a},
        pair=(e, 3),
    )
    assert [x.ref for x in find_assets(value)] == ["r0", "r1", "r2", "r3", "r4"]


def test_find_assets_identity_and_containers() -> None:
    a = Asset(ref="same")
    b = Asset(ref="same")  # equal but a different object: reported too
    assert find_assets(a) == [a]
    found = find_assets([a, a, {"x": [b]}, (a,), {"y": b}, {1, "s"}, frozenset({2})])
    assert len(found) == 2
    assert found[0] is a
    assert found[1] is b
    assert find_assets({"a": "text", "b": 3, "c": None, "d": b"bytes"}) == []
    assert find_assets(Asset(url="https://h/x")) == [Asset(url="https://h/x")]


def test_find_assets_dict_keys_are_not_searched() -> None:
    # dict keys must be hashable and Assets are not; values are what carry files
    asset = Asset(ref="v")
    assert find_assets({"k": asset}) == [asset]


def test_find_assets_survives_cycles_and_depth() -> None:
    a = Asset(ref="deep")
    cyclic: list[object] = [a]
    cyclic.append(cyclic)
    assert find_assets(cyclic) == [a]
    deep: object = a
    for _ in range(5000):
        deep = [deep]
    assert find_assets(deep) == [a]
