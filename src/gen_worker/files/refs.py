"""File-ref rules: where a request may write its outputs, and what a safe relative ref is.

A ref becomes a path on disk (``<root>/<ref>``), so every ref is checked as a relative posix
path before it is joined to anything: no absolute paths, no ``.``/``..`` segments, no
backslashes (a Windows separator on some filesystems), no empty segments, no control
characters. Output refs additionally must stay in the request's own namespace::

    image.png                              -> jobs/<request_id>/outputs/image.png
    jobs/<request_id>/outputs/a/b.png      -> unchanged
    jobs/<other>/..., jobs/<request_id>/x  -> refused
"""

from __future__ import annotations

from gen_worker.errors import ValidationError

__all__ = ["OUTPUT_REF_FORM", "check_relative_ref", "check_request_id", "output_ref"]

OUTPUT_REF_FORM = (
    "expected a relative name such as 'image.png' or 'frames/0001.png', "
    "or a full ref 'jobs/<request_id>/outputs/<name>'"
)
# A segment becomes one file name; most filesystems refuse names above 255 bytes.
_MAX_SEGMENT_BYTES = 255
_MAX_REF_CHARS = 1024
# Error messages echo the ref; a hostile multi-megabyte ref must not become a log line.
_SHOWN_MAX = 200


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX] + "..."


def _char_problem(ref: str) -> str | None:
    """Why the characters of ``ref`` cannot form a path, or None when they can."""
    if "\x00" in ref:
        return "it contains a NUL character"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in ref):
        return "it contains a control character"
    if "\\" in ref:
        return "it contains a backslash; use '/' between segments"
    try:
        ref.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid Unicode text (it contains a lone surrogate)"
    return None


def _segment_problem(parts: list[str]) -> str | None:
    """Why the '/'-separated ``parts`` are not a safe relative path, or None when they are."""
    for part in parts:
        if not part:
            return "it has an empty segment ('//' or a leading or trailing '/')"
        if part in (".", ".."):
            return f"it has a '{part}' segment; refs may not climb or repeat directories"
        if len(part.encode("utf-8")) > _MAX_SEGMENT_BYTES:
            return f"a segment is longer than {_MAX_SEGMENT_BYTES} bytes"
    return None


def _path_problem(ref: str) -> str | None:
    if not ref:
        return "it is empty"
    if len(ref) > _MAX_REF_CHARS:
        return f"it is longer than {_MAX_REF_CHARS} characters"
    if ref.startswith("/"):
        return "it is an absolute path"
    return _char_problem(ref) or _segment_problem(ref.split("/"))


def check_relative_ref(ref: object, what: str, form: str) -> list[str]:
    """Return the segments of ``ref`` if it is a safe relative posix path, else raise.

    ``what`` names the ref in the message ("output ref", "input ref"); ``form`` says what is
    valid.
    """
    if not isinstance(ref, str):
        raise ValidationError(f"{what} must be a string, got {type(ref).__name__}; {form}")
    problem = _path_problem(ref)
    if problem is not None:
        raise ValidationError(f"invalid {what} {_shown(ref)!r}: {problem}; {form}")
    return ref.split("/")


def check_request_id(request_id: object) -> str:
    """Return ``request_id`` if it can name one directory, else raise ValidationError.

    The id becomes a path segment (``jobs/<request_id>/``, ``<inputs>/<request_id>/``), and a
    caller may choose it in the dev runner, so it gets the same scrutiny as a ref.
    """
    form = "a request id must be one non-empty path segment without '/', '\\' or control chars"
    parts = check_relative_ref(request_id, "request id", form)
    if len(parts) != 1:
        raise ValidationError(f"invalid request id {_shown(str(request_id))!r}: {form}")
    return parts[0]


def _namespace_problem(parts: list[str], request_id: str) -> str | None:
    """For a ref starting with ``jobs/``: why it is not this request's output, or None."""
    if parts[1] != request_id:
        return (
            "it is in another request's namespace; this request may write only under "
            f"jobs/{request_id}/outputs/"
        )
    if len(parts) < 3 or parts[2] != "outputs":
        return f"only jobs/{request_id}/outputs/ is writable, not the rest of jobs/{request_id}/"
    if len(parts) == 3:
        return "the output name after 'outputs/' is empty"
    return None


def output_ref(ref: str, request_id: str) -> str:
    """Normalise and check an output ref for one request.

    A bare relative name (``image.png``, ``frames/0001.png``) means
    ``jobs/<request_id>/outputs/<name>``; a full ref must be
    ``jobs/<request_id>/outputs/<name...>``. Anything else raises ValidationError naming the
    ref and saying what is valid. Returns the full normalised ref (posix).
    """
    request_id = check_request_id(request_id)
    parts = check_relative_ref(ref, "output ref", OUTPUT_REF_FORM)
    # A lone "jobs" is an ordinary file name; "jobs/<x>/..." claims a request namespace.
    if parts[0] != "jobs" or len(parts) == 1:
        return "/".join(["jobs", request_id, "outputs", *parts])
    problem = _namespace_problem(parts, request_id)
    if problem is not None:
        raise ValidationError(f"invalid output ref {_shown(ref)!r}: {problem}; {OUTPUT_REF_FORM}")
    return "/".join(parts)
