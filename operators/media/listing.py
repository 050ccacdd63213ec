"""List source objects under a local folder or any fsspec URL, with fingerprints.

Local sources (a plain path or ``file://``) are walked with ``os.scandir`` so that
symlink loops, dangling links, FIFOs and unreadable entries become dead letters
(stage ``list``) instead of crashing the job. Symlinks are followed, and each
real folder is walked once: the source's own folders first, then those reached
through links, each folder's entries in name order (with include/exclude patterns,
which select by path, a folder is then walked again by up to 7 other paths it is
reached by). Each file is listed once: at
its real path inside the source when the walk lists it there, else under the
first path the walk meets it by. Folders passed as ``skip`` (the run's own output
and embedded store) are never walked. Remote sources go through fsspec's
``find``. URIs come back as absolute plain paths for local files and as
``scheme://path`` for everything else; the order is sorted, so deterministic.

Glob rules (``include`` / ``exclude``): patterns match the path relative to the
root with ``fnmatchcase`` (``*`` also crosses ``/``); ``**/`` may match zero
folders; a pattern without ``/`` also matches the file's base name. An object is
kept when it matches any include pattern (or there are none) and no exclude
pattern. A folder matching an exclude pattern (as ``dir`` or ``dir/``) is not
walked at all.

Fingerprints: ``etag:<ETag>`` where the store gives one (S3), else
``version:<VersionId>``, else ``size:<n>:mtime:<t>``; local files use
``size:<n>:mtime_ns:<t>``; ``sha256:<hex>`` of the content only when the store
gives none of those.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import hashlib
import inspect
import os
import posixpath
import stat
import urllib.parse
from collections.abc import Collection
from fnmatch import fnmatchcase
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from operators.units import DeadLetter, SourceObject

_LOCAL_PREFIXES = ("file://", "local://")


def is_local_uri(uri: str) -> bool:
    """True for a plain path or a ``file://`` / ``local://`` URL."""
    return "://" not in uri or uri.startswith(_LOCAL_PREFIXES)


def is_data_uri(uri: str) -> bool:
    """True for an inline ``data:`` URI (the scheme in any case, as URI schemes are case-insensitive)."""
    return uri[:5].lower() == "data:"


def local_path(uri: str) -> str:
    """The absolute local path of a plain path or ``file://`` URL."""
    if uri.startswith("file://"):
        uri = file_url_path(uri)
    elif uri.startswith("local://"):
        uri = uri[len("local://") :]
    return os.path.abspath(os.path.expanduser(uri))


def file_url_path(url: str) -> str:
    """The path a ``file://`` URL names: percent-decoded, as RFC 8089 writes it (Path.as_uri() gives
    ``my%20pic.png``), its host empty or ``localhost``. A plain path is never decoded."""
    rest = url[len("file://"):]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    return urllib.parse.unquote(rest)


def _normalise_options(protocol: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Storage options as the backend wants them (``endpoint_url`` into ``client_kwargs`` if needed)."""
    opts = dict(storage_options or {})
    if protocol in ("s3", "s3a") and "endpoint_url" in opts:
        import s3fs

        if "endpoint_url" not in inspect.signature(s3fs.S3FileSystem.__init__).parameters:
            client_kwargs = dict(opts.get("client_kwargs") or {})
            client_kwargs.setdefault("endpoint_url", opts.pop("endpoint_url"))
            opts["client_kwargs"] = client_kwargs
    return opts


def fs_for(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem and the backend path for a URI (plain paths are local)."""
    if is_local_uri(uri):
        return fsspec.filesystem("file"), local_path(uri)
    head = uri.split("://", 1)[0]
    protocol = head.split("::")[-1]
    opts = _normalise_options(protocol, storage_options)
    if "::" in head:  # a chained URL ("simplecache::s3://..."): fsspec builds the chain
        return fsspec.core.url_to_fs(uri, **opts)
    # One protocol: url_to_fs would also split "::" inside the key (S3 allows "a::b.txt") as a chain.
    cls = fsspec.get_filesystem_class(protocol)
    return fsspec.filesystem(protocol, **{**cls._get_kwargs_from_urls(uri), **opts}), cls._strip_protocol(uri)


def glob_match(rel_path: str, pattern: str) -> bool:
    """Whether a root-relative POSIX path matches one glob pattern (rules in the module doc)."""
    if fnmatchcase(rel_path, pattern):
        return True
    if "**/" in pattern and fnmatchcase(rel_path, pattern.replace("**/", "")):
        return True
    return "/" not in pattern and fnmatchcase(posixpath.basename(rel_path), pattern)


def selected(rel_path: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    """Whether a root-relative path passes the include and exclude globs."""
    if include and not any(glob_match(rel_path, p) for p in include):
        return False
    return not (exclude and any(glob_match(rel_path, p) for p in exclude))


def _dir_excluded(rel_dir: str, exclude: list[str] | None) -> bool:
    """Whether a whole folder is excluded (pattern matches ``dir`` or ``dir/``)."""
    return bool(exclude) and any(glob_match(rel_dir, p) or fnmatchcase(rel_dir + "/", p) for p in exclude)


def in_selection(rel_path: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    """Whether a listing with these patterns would take the file at rel_path (its folders included)."""
    parts = rel_path.split("/")
    folders = ("/".join(parts[:i]) for i in range(1, len(parts)))
    return selected(rel_path, include, exclude) and not any(_dir_excluded(f, exclude) for f in folders)


def _dead(uri: str, error_type: str, message: str) -> DeadLetter:
    """A listing-stage dead letter."""
    return DeadLetter(uri=uri, stage="list", error_type=error_type, message=message)


def printable_path(path: str) -> str:
    """A path as valid text: bytes that are not UTF-8 (held as surrogate escapes) shown as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown_path(path: str) -> str:
    """A path for a console line: printable_path, with control characters escaped (\\n, \\x1b...).

    A file may be named "a\\nlisted 0 objects": printed raw, its name forged lines of the output.
    """
    return "".join(c.encode("unicode_escape").decode() if ord(c) < 32 or 127 <= ord(c) < 160 else c
                   for c in printable_path(path))


def _file_kind(mode: int) -> str:
    """A human name for a non-regular file type."""
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _local_entry(
    path: str, rel: str, ancestors: frozenset[tuple[int, int]], objects: list[SourceObject], dead: list[DeadLetter],
    found: list, real: str = "", walked: Collection[tuple[int, int]] = (),
) -> None:
    """Classify one local entry: file → object, folder → found (with its real path and identity), else → dead letter."""
    if printable_path(path) != path:
        # Point ids, payloads and Arrow columns are UTF-8 text: such a name cannot be stored.
        dead.append(_dead(printable_path(path), "InvalidFileName",
                          "file or folder name is not valid UTF-8; rename it to ingest it"))
        return
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        if os.path.islink(path):
            dead.append(_dead(path, "DanglingSymlink", f"symlink target does not exist: {os.readlink(path)}"))
        else:
            dead.append(_dead(path, "FileNotFoundError", "file disappeared while listing"))
        return
    except OSError as exc:  # ELOOP for a link pointing (indirectly) at itself, EACCES, ...
        kind = "SymlinkLoop" if exc.errno == 40 else type(exc).__name__
        dead.append(_dead(path, kind, f"cannot stat: {exc.strerror or exc}"))
        return
    if stat.S_ISDIR(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            dead.append(_dead(path, "SymlinkLoop", "symlink loop: folder links back to one of its parents"))
        elif key not in walked:  # one walked already through another path holds nothing new
            found.append((path, rel, ancestors | {key}, real, key))
        return
    if not stat.S_ISREG(st.st_mode):
        dead.append(_dead(path, "NotARegularFile", f"not a regular file ({_file_kind(st.st_mode)})"))
        return
    if not os.access(path, os.R_OK):
        dead.append(_dead(path, "PermissionError", "file is not readable"))
        return
    objects.append(SourceObject(uri=path, size=st.st_size, fingerprint=local_fingerprint(st), mtime=st.st_mtime))


MAX_PATHS_PER_FOLDER = 8  # with include/exclude patterns: the paths a folder is walked by, at most


def _folder_key(path: str) -> tuple[int, int] | None:
    """The (st_dev, st_ino) of a folder, None where path is no folder (not created yet, say)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _list_local(root: str, include: list[str] | None, exclude: list[str] | None,
                skip: Collection[str] = ()) -> tuple[list[SourceObject], list[DeadLetter]]:
    """Walk a local folder (or take one local file), never walking the folders in skip."""
    objects: list[SourceObject] = []
    dead: list[DeadLetter] = []
    if not os.path.exists(root):
        raise FileNotFoundError(f"source not found: {root}")
    if not os.path.isdir(root):
        name = os.path.basename(root)
        if selected(name, include, exclude):
            _local_entry(root, name, frozenset(), objects, dead, [])
        return objects, dead
    root_st = os.stat(root)
    root_real = os.path.realpath(root)
    root_key = (root_st.st_dev, root_st.st_ino)
    # Each folder carries its real path: resolved once where a link leads into it, else its
    # parent's joined with its name, so a tree without links costs no extra system call.
    stack: list[tuple[str, str, frozenset[tuple[int, int]], str, tuple[int, int]]] = [
        (root, "", frozenset({root_key}), root_real, root_key)]
    # Each real folder is walked once: links that join again (a -> d1, b -> d1 in every folder of
    # a chain) would otherwise list 2^depth copies of the same files. Folders at their real place
    # in the source are all walked first, so a link into the source never takes a folder's files
    # away from their real paths; links are walked after, in the order the walk met them.
    # The folders to leave out are never walked, wherever the walk meets them (at their place or
    # through a link). The root itself is always walked: a source is never left out whole.
    skip_keys = {p: k for p in skip if (k := _folder_key(p)) is not None and k != root_key}
    skipped = set(skip_keys.values())
    # ...and so is what a link reaches inside one ("last -> runs/run1"); a folder holding the whole
    # source (output.dir ".." of it) leaves nothing out.
    skipped_under = tuple(r for r in (os.path.join(os.path.realpath(p), "") for p in skip_keys)
                          if not os.path.join(root_real, "").startswith(r))
    walked: set[tuple[int, int]] = set(skipped)
    # With include/exclude patterns, which files a folder gives depends on the path it is reached
    # by: walked once, the files of "archive/2024" excluded there were lost under "latest ->
    # archive/2024" with include "latest/**". So with patterns a folder walked already is walked
    # again through another path, but only after every folder's first walk (a file keeps the path
    # the first walks give it, patterns or not), and by at most MAX_PATHS_PER_FOLDER paths (links
    # that join again would take 2^depth walks).
    patterns = bool(include or exclude)
    blocked = skipped if patterns else walked
    paths_walked: dict[tuple[int, int], int] = {}
    via_links: list[tuple[str, str, frozenset[tuple[int, int]], str, tuple[int, int]]] = []
    again: list[tuple[str, str, frozenset[tuple[int, int]], str, tuple[int, int]]] = []
    linked: dict[str, str] = {}  # object reached through a symlink -> its real path
    direct: set[str] = set()  # the real paths of the objects listed where they are
    links_phase = again_phase = False
    while stack or via_links or again:
        if not stack and via_links:  # the source's own tree is done: the folders reached through links now
            stack, via_links, links_phase = via_links[::-1], [], True
        elif not stack:  # every first walk is done: the paths that patterns may select differently
            stack, again, again_phase = again[::-1], [], True
        entry = stack.pop()
        folder, rel_folder, ancestors, folder_real, key = entry
        if key in skipped or (skipped_under and os.path.join(folder_real, "").startswith(skipped_under)):
            continue
        if key in walked:  # reached by two links before either was walked
            if not patterns or paths_walked.get(key, 1) >= MAX_PATHS_PER_FOLDER:
                continue
            if not again_phase:
                again.append(entry)
                continue
            paths_walked[key] = paths_walked.get(key, 1) + 1
        walked.add(key)
        try:
            with os.scandir(folder) as it:
                entries = sorted(((entry.name, _is_link(entry)) for entry in it))
        except OSError as exc:
            dead.append(_dead(folder, type(exc).__name__, f"cannot list folder: {exc.strerror or exc}"))
            continue
        found: list[tuple[str, str, frozenset[tuple[int, int]], str, tuple[int, int]]] = []
        for name, is_link in entries:
            path = os.path.join(folder, name)
            rel = f"{rel_folder}/{name}" if rel_folder else name
            real = os.path.realpath(path) if is_link else os.path.join(folder_real, name)
            before = len(objects)
            if os.path.isdir(path):
                if not _dir_excluded(rel, exclude):
                    _local_entry(path, rel, ancestors, objects, dead, found, real, blocked)
            elif selected(rel, include, exclude):
                _local_entry(path, rel, ancestors, objects, dead, found, real, blocked)
            if len(objects) > before:
                if real == os.path.join(root_real, rel):
                    direct.add(real)
                else:
                    linked[path] = real
        for entry in reversed(found):  # popped in name order: the first path in the walk's order wins
            if links_phase or entry[3] == os.path.join(root_real, entry[1]):
                stack.append(entry)
        if not links_phase:
            via_links += [entry for entry in found if entry[3] != os.path.join(root_real, entry[1])]
    if linked:
        # A file the walk also listed at its real path inside the source ("latest -> photos/2024",
        # "alias.txt -> a.txt") is kept there only: it would be stored twice. One reached only
        # through links (outside the source, excluded, or under a name that cannot be listed) stays,
        # once: under the first path the walk met it by.
        taken = set(direct)
        kept: list[SourceObject] = []
        for obj in objects:
            real = linked.get(obj.uri)
            if real is not None:
                if real in taken:
                    continue
                taken.add(real)
            kept.append(obj)
        objects = kept
    return objects, dead


def _is_link(entry: os.DirEntry) -> bool:
    """Whether a folder entry is a symlink (False for one that vanished while listing)."""
    try:
        return entry.is_symlink()
    except OSError:
        return False


def _as_timestamp(value: Any) -> float | None:
    """A POSIX timestamp from the many shapes stores report times in."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return _as_timestamp(_dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            pass
        try:  # an HTTP date (Last-Modified: Mon, 07 Dec 2026 18:00:00 GMT)
            return _as_timestamp(email.utils.parsedate_to_datetime(value))
        except (TypeError, ValueError):
            return None
    return None


def info_mtime(info: dict[str, Any]) -> float | None:
    """Modification time from an fsspec ``info`` dict, where the store gives one."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created", "Last-Modified"):
        ts = _as_timestamp(info.get(key))
        if ts is not None:
            return ts
    return None


def info_fingerprint(info: dict[str, Any]) -> str | None:
    """Fingerprint from an fsspec ``info`` dict (ETag, version id, size+mtime), None if it has none."""
    etag = info.get("ETag") or info.get("etag") or info.get("e_tag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    version = info.get("VersionId") or info.get("version_id") or info.get("generation")
    if version:
        return f"version:{version}"
    mtime = info_mtime(info)
    if mtime is not None and info.get("size") is not None:
        return f"size:{int(info['size'])}:mtime:{mtime:.6f}"
    return None


def local_fingerprint(st: os.stat_result) -> str:
    """Fingerprint of a local file from its ``stat``."""
    return f"size:{st.st_size}:mtime_ns:{st.st_mtime_ns}"


def _sha256_fingerprint(fs: AbstractFileSystem, path: str) -> str:
    """sha256 of an object's content, streamed."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def forget_cached_listing(fs: AbstractFileSystem, path: str) -> None:
    """Drop fsspec's cached listing of path, so that info() asks the store (s3fs caches listings)."""
    try:
        fs.invalidate_cache(path)
    except Exception:  # some backends keep no cache
        pass


def object_fingerprint(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The current fingerprint of one object, as ``list_objects`` would give it now."""
    if is_local_uri(uri):
        return local_fingerprint(os.stat(local_path(uri)))
    fs, path = fs_for(uri, storage_options)
    forget_cached_listing(fs, path)
    return info_fingerprint(fs.info(path)) or _sha256_fingerprint(fs, path)


def _remote_uri(uri: str, fs: AbstractFileSystem, name: str) -> str:
    """Full URI (with the caller's scheme) of a backend path."""
    if "::" in uri:
        return fs.unstrip_protocol(name)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if {"http", "https"} & set(protocols):  # the http backend's paths are whole URLs; a key may hold "://"
        return name
    return f"{uri.split('://', 1)[0]}://{name}"


def _with_head(fs: AbstractFileSystem, name: str, info: dict[str, Any]) -> dict[str, Any]:
    """info, completed by the object's own info where the listing gave no size or version (a web
    server's index page names its files only: one HEAD request each then, not a download)."""
    if info.get("size") is not None and info_fingerprint(info) is not None:
        return info
    try:
        return {**info, **{k: v for k, v in fs.info(name).items() if v is not None}}
    except Exception:  # the listing's info stands; a missing size is a dead letter below
        return info


def _list_remote(
    uri: str, include: list[str] | None, exclude: list[str] | None, storage_options: dict[str, Any] | None
) -> tuple[list[SourceObject], list[DeadLetter]]:
    """List an fsspec location recursively."""
    fs, root = fs_for(uri, storage_options)
    root = root.rstrip("/") or root
    forget_cached_listing(fs, root)
    single = _single_object(fs, root, asked_for_folder=uri.endswith("/"))
    if single is not None:
        entries = {root: single}
        base = posixpath.dirname(root)
    else:
        entries = fs.find(root, detail=True, withdirs=False)
        entries.pop(root, None)  # the folder's own zero-byte marker key, if the store lists it
        base = root
        if not entries and not fs.exists(root):
            top = root.strip("/").split("/")[0]
            if not top or not fs.exists(top):  # a missing bucket is a configuration error; an empty prefix is not
                raise FileNotFoundError(f"source not found: {uri}")
    objects: list[SourceObject] = []
    dead: list[DeadLetter] = []
    for name, info in entries.items():
        if info.get("type", "file") != "file":
            continue
        if name.endswith("/") and not info.get("size"):  # an empty "folder/" key: a console's folder marker
            continue
        rel = name[len(base) :].lstrip("/") if base and name.startswith(base) else posixpath.basename(name)
        if not in_selection(rel, include, exclude):  # excluded folders too, as a local walk skips them
            continue
        full = _remote_uri(uri, fs, name)
        info = _with_head(fs, name, info)
        if info.get("size") is None:  # taken for 0 it would fail as an empty file
            dead.append(_dead(full, "UnknownSize", "the store gives no size for this object (no Content-Length)"))
            continue
        try:
            fingerprint = info_fingerprint(info) or _sha256_fingerprint(fs, name)
        except Exception as exc:  # unreadable object: fail it, keep listing
            dead.append(_dead(full, type(exc).__name__, f"cannot fingerprint: {exc}"))
            continue
        objects.append(SourceObject(uri=full, size=int(info["size"]), fingerprint=fingerprint, mtime=info_mtime(info)))
    return objects, dead


def _single_object(fs: Any, root: str, asked_for_folder: bool) -> dict[str, Any] | None:
    """The info of the one object a remote source names, or None when it names a folder.

    An object store can hold a key "pfx" beside keys "pfx/...": some tools (s3fs-fuse, consoles)
    write such a zero-byte key as a folder marker. Taken for the source, it would hide the whole
    folder, and --prune would then delete every point under it. So a URI ending in "/" is always a
    folder, and a zero-byte key with keys under it is that folder's marker.
    """
    if asked_for_folder:
        return None
    try:
        info = fs.info(root)  # one request, where isfile() then info() made two
    except Exception:  # as fsspec's isfile(): anything but an answer means "not one object"; find() decides
        return None
    if info.get("type", "file") != "file":
        return None
    if info.get("size"):
        return info
    # s3fs's find lists the key itself too (it strips the trailing "/"): only other keys are children.
    children = any(key != root for key in fs.find(root + "/", maxdepth=1, withdirs=False))
    return None if children else info


def list_objects(
    uri: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    skip: Collection[str] = (),
) -> tuple[list[SourceObject], list[DeadLetter]]:
    """List every object under a local folder/file or fsspec URL, sorted by URI, with listing dead letters.

    skip: local folders never listed where a local source holds them (a run's own output.dir and
    embedded store); folders that do not exist yet, and remote sources, are not affected.
    """
    if is_local_uri(uri):
        objects, dead = _list_local(local_path(uri), include, exclude, skip)
    else:
        objects, dead = _list_remote(uri, include, exclude, storage_options)
    objects.sort(key=lambda o: o.uri)
    dead.sort(key=lambda d: (d.uri, d.error_type))
    return objects, dead
