"""Listing: local folders (links, loops, special files, globs) and a real S3 API (moto)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import fsspec
import pytest

from operators.media import listing, reading
from operators.media.listing import fs_for, glob_match, info_fingerprint, list_objects, local_path, object_fingerprint
from operators.media.reading import open_uri, read_with_fingerprint


def _tree(root: Path) -> Path:
    """a.txt, b.png, sub/c.txt, sub/deep/d.png, skip/e.txt."""
    for rel, data in {"a.txt": b"a", "b.png": b"bb", "sub/c.txt": b"ccc", "sub/deep/d.png": b"dddd", "skip/e.txt": b"e"}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _rels(objects, root: Path) -> list[str]:
    return [str(Path(o.uri).relative_to(root)) for o in objects]


def test_local_recursive_sorted_absolute(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    objects, dead = list_objects(str(root))
    assert dead == []
    assert _rels(objects, root) == ["a.txt", "b.png", "skip/e.txt", "sub/c.txt", "sub/deep/d.png"]
    assert all(os.path.isabs(o.uri) and "://" not in o.uri for o in objects)
    st = os.stat(root / "sub/c.txt")
    c = objects[3]
    assert c.size == 3 and c.fingerprint == f"size:3:mtime_ns:{st.st_mtime_ns}" and c.mtime == pytest.approx(st.st_mtime)


def test_file_urls_are_percent_decoded_and_plain_paths_never() -> None:
    assert local_path("file:///data/my%20pic%20%C3%A9.png") == "/data/my pic é.png"
    assert local_path("file://localhost/data/a%23b.txt") == "/data/a#b.txt"
    assert local_path("/data/100%20.png") == "/data/100%20.png"
    assert local_path("local:///data/100%20.png") == "/data/100%20.png"


def test_file_url_and_relative_path_match_plain_path(tmp_path: Path, monkeypatch) -> None:
    root = _tree(tmp_path)
    plain, _ = list_objects(str(root))
    assert list_objects(f"file://{root}")[0] == plain
    monkeypatch.chdir(root.parent)
    assert list_objects(root.name)[0] == plain


def test_single_file_root(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    objects, dead = list_objects(str(root / "sub/c.txt"))
    assert [o.uri for o in objects] == [str(root / "sub/c.txt")] and dead == []


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["*.png"], None, ["b.png", "sub/deep/d.png"]),  # no '/': matches the base name too
        (["**/*.txt"], None, ["a.txt", "skip/e.txt", "sub/c.txt"]),  # '**/' may match zero folders
        (["sub/*"], None, ["sub/c.txt", "sub/deep/d.png"]),  # fnmatch '*' crosses '/'
        (None, ["skip/**"], ["a.txt", "b.png", "sub/c.txt", "sub/deep/d.png"]),
        (["*.txt"], ["sub/*"], ["a.txt", "skip/e.txt"]),
    ],
)
def test_globs(tmp_path: Path, include, exclude, expected) -> None:
    root = _tree(tmp_path)
    assert _rels(list_objects(str(root), include, exclude)[0], root) == expected


def test_glob_match_rules() -> None:
    assert glob_match("x/y/z.md", "**/*.md") and glob_match("z.md", "**/*.md")
    assert glob_match("a/b/c.txt", "a/**/c.txt") and glob_match("a/c.txt", "a/**/c.txt")
    assert not glob_match("a/b.TXT", "*.txt")  # case-sensitive, deterministic everywhere


def test_symlink_loops_dangling_links_and_fifo_become_dead_letters(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    os.symlink(root, root / "sub/loop")  # folder link back to an ancestor
    os.symlink("self", root / "self")  # link pointing at itself (ELOOP)
    os.symlink(root / "missing.txt", root / "dangling.txt")
    os.mkfifo(root / "pipe.txt")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("a file outside the source")
    os.symlink(outside, root / "link_to_outside.txt")  # a good file link is listed under its own path
    objects, dead = list_objects(str(root))
    assert "link_to_outside.txt" in _rels(objects, root)
    assert len(objects) == 6
    kinds = {Path(d.uri).name: d.error_type for d in dead}
    assert kinds == {"loop": "SymlinkLoop", "self": "SymlinkLoop", "dangling.txt": "DanglingSymlink", "pipe.txt": "NotARegularFile"}
    assert all(d.stage == "list" for d in dead)


def test_a_file_reached_through_a_link_inside_the_source_is_listed_once(tmp_path: Path) -> None:
    """"latest -> photos/2024" and "alias.txt -> a.txt" would store each file twice: the walk lists them
    at their real paths only. A link to what the patterns leave out is still listed where it is."""
    root = _tree(tmp_path / "src")
    os.symlink(root / "sub/deep", root / "latest")
    os.symlink(root / "a.txt", root / "alias.txt")
    os.symlink("sub", root / "relative")
    assert _rels(list_objects(str(root))[0], root) == ["a.txt", "b.png", "skip/e.txt", "sub/c.txt", "sub/deep/d.png"]
    # skip/ is excluded: its file is not listed at its real path, so the link to it is.
    os.symlink(root / "skip", root / "kept")
    assert _rels(list_objects(str(root), exclude=["skip/"])[0], root) == [
        "a.txt", "b.png", "kept/e.txt", "sub/c.txt", "sub/deep/d.png"]
    # A symlinked root: its real path is the source's, so its files are listed once, under the link.
    os.symlink(root, tmp_path / "root-link")
    objects, _ = list_objects(str(tmp_path / "root-link"))
    assert _rels(objects, tmp_path / "root-link") == ["a.txt", "b.png", "skip/e.txt", "sub/c.txt", "sub/deep/d.png"]
    # A folder whose name is not UTF-8 cannot be listed: its file stays listed through a link to it.
    other = tmp_path / "other"
    other.mkdir()
    raw = os.fsencode(other) + b"/caf\xe9"
    os.mkdir(raw)
    with open(raw + b"/photo.jpg", "wb") as fh:
        fh.write(b"x")
    os.symlink(raw, os.fsencode(other) + b"/cafe")
    objects, dead = list_objects(str(other))
    assert _rels(objects, other) == ["cafe/photo.jpg"] and [d.error_type for d in dead] == ["InvalidFileName"]


def _link_chain(base: Path, depth: int) -> None:
    """Folders d0..d<depth-1>, each with f<i>.txt and two links a, b to the next folder: 2^depth paths to the last."""
    for i in range(depth):
        (base / f"d{i}").mkdir(parents=True)
        (base / f"d{i}" / f"f{i}.txt").write_text(str(i))
    for i in range(depth - 1):
        os.symlink(f"../d{i + 1}", base / f"d{i}" / "a")
        os.symlink(f"../d{i + 1}", base / f"d{i}" / "b")


def test_folders_joined_by_many_links_are_walked_once(tmp_path: Path) -> None:
    """Two links to the next folder in each of 14 folders once listed 2^14 - 1 = 16,383 objects for 14 files
    (17 folders: 131,071 objects, 50 s; deeper ones hung): each real folder is walked once, and a file reached
    by several link paths is listed once, under the first path the walk meets it by (names in sorted order)."""
    depth = 14
    root = tmp_path / "src"
    _link_chain(root, depth)  # inside the source: every file at its real path
    objects, dead = list_objects(str(root))
    assert dead == [] and _rels(objects, root) == sorted(f"d{i}/f{i}.txt" for i in range(depth))
    # The same chain outside the source, reached through one link: each file once, through the a links.
    # The source's own folders are walked before the links, so x.txt is met before ext/f0.txt.
    _link_chain(tmp_path / "outside", depth)
    os.symlink(tmp_path / "outside" / "d0", root / "ext")
    os.symlink(tmp_path / "outside" / "d0" / "f0.txt", root / "x.txt")
    objects, dead = list_objects(str(root))
    assert dead == []
    assert _rels(objects, root) == sorted([f"d{i}/f{i}.txt" for i in range(depth)] + ["x.txt"]
                                          + ["ext/" + "a/" * i + f"f{i}.txt" for i in range(1, depth)])
    # A loop is still a loop, even inside a folder walked already through another link.
    os.symlink("../d0", tmp_path / "outside" / f"d{depth - 1}" / "back")
    _, dead = list_objects(str(root))
    assert [(d.uri, d.error_type) for d in dead] == [(str(root / "ext" / ("a/" * (depth - 1)) / "back"), "SymlinkLoop")]


def test_folders_to_skip_are_never_walked(tmp_path: Path) -> None:
    """The run's own output.dir and embedded store inside a local source ("." with output.dir "runs") are
    left out wherever the walk meets them, through a link too; the root and missing folders change nothing."""
    root = _tree(tmp_path / "src")
    (root / "runs" / "r1").mkdir(parents=True)
    (root / "runs" / "r1" / "dead_letters.jsonl").write_text('{"uri": "x"}\n')
    (root / "qdrant" / "collection").mkdir(parents=True)
    (root / "qdrant" / "collection" / "storage.sqlite").write_bytes(b"SQLite format 3\0")
    os.symlink(root / "runs", root / "latest-runs")
    want = ["a.txt", "b.png", "skip/e.txt", "sub/c.txt", "sub/deep/d.png"]
    assert _rels(list_objects(str(root), skip=[str(root / "runs"), str(root / "qdrant")])[0], root) == want
    assert len(list_objects(str(root))[0]) == 7  # without skip: the dead letters and the store's file
    assert _rels(list_objects(str(root), skip=[str(root), str(root / "runs"), str(root / "qdrant"),
                                               str(root / "not-yet")])[0], root) == want


def test_excluded_dead_entries_are_not_reported(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    os.symlink(root / "missing.txt", root / "dangling.txt")
    assert list_objects(str(root), exclude=["dangling.txt"])[1] == []


def test_unreadable_folder_and_file(tmp_path: Path, monkeypatch) -> None:
    """chmod 000 does not stop root, so the permission failures are injected where the OS would raise them."""
    root = _tree(tmp_path)
    real_scandir, real_access = os.scandir, os.access

    def scandir(path):
        if str(path) == str(root / "sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    monkeypatch.setattr(listing.os, "access", lambda p, mode: False if str(p).endswith("a.txt") else real_access(p, mode))
    objects, dead = list_objects(str(root))
    assert _rels(objects, root) == ["b.png", "skip/e.txt"]
    assert {(Path(d.uri).name, d.error_type) for d in dead} == {("sub", "PermissionError"), ("a.txt", "PermissionError")}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 files; covered by the injected test above")
def test_unreadable_for_real(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    os.chmod(root / "sub", 0)
    try:
        _, dead = list_objects(str(root))
    finally:
        os.chmod(root / "sub", 0o755)
    assert [d.error_type for d in dead] == ["PermissionError"]


def test_fingerprint_follows_changes(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    before = list_objects(str(root))[0][0].fingerprint
    os.utime(root / "a.txt", ns=(1_000_000_000_123, 1_000_000_000_123))
    after = list_objects(str(root))[0][0].fingerprint
    assert before != after and after.endswith(":mtime_ns:1000000000123")


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="source not found"):
        list_objects(str(tmp_path / "nope"))


def test_open_uri_and_fs_for_local(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert open_uri(str(root / "sub/c.txt")) == b"ccc" == open_uri(f"file://{root}/sub/c.txt")
    fs, path = fs_for(f"file://{root}/sub")
    assert path == str(root / "sub") and fs.isdir(path)


def test_info_fingerprint_preferences() -> None:
    assert info_fingerprint({"ETag": '"abc"', "VersionId": "v1", "size": 1}) == "etag:abc"
    assert info_fingerprint({"VersionId": "v1", "size": 1}) == "version:v1"
    assert info_fingerprint({"size": 3, "mtime": 12.5}) == "size:3:mtime:12.500000"
    assert info_fingerprint({"size": 3}) is None


def test_memory_filesystem_and_sha256_fallback(monkeypatch) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/mlist/x/one.txt", b"one")
    fs.pipe("/mlist/two.md", b"two")
    objects, dead = list_objects("memory://mlist")
    assert [o.uri for o in objects] == ["memory:///mlist/two.md", "memory:///mlist/x/one.txt"] and dead == []
    assert objects[0].fingerprint.startswith("size:3:mtime:")
    assert open_uri(objects[1].uri) == b"one"
    fs.pipe("/mlist/x/https://example.com/about.txt", b"a key holding a URL (a crawl mirror)")
    objects, dead = list_objects("memory://mlist/x")
    assert [o.uri for o in objects] == ["memory:///mlist/x/https://example.com/about.txt", "memory:///mlist/x/one.txt"]
    assert open_uri(objects[0].uri) == b"a key holding a URL (a crawl mirror)"
    fs.rm("/mlist/x/https:", recursive=True)
    monkeypatch.setattr(listing, "info_fingerprint", lambda info: None)  # a store that reports nothing
    objects, _ = list_objects("memory://mlist", include=["*.md"])
    assert objects[0].fingerprint == "sha256:" + hashlib.sha256(b"two").hexdigest()
    fs.rm("/mlist", recursive=True)


def test_a_web_server_folder_and_file(tmp_path: Path) -> None:
    """fsspec's http backend keeps the scheme in its paths, and a server's index page gives names
    only: each object's size and version come from one HEAD request (not a download), and the
    fingerprint is the one a single object's lookup gives."""
    import functools
    import http.server
    import threading

    from operators.media.expand import ExpandSettings, expand_object

    _tree(tmp_path / "www" / "media")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/media/"
        objects, dead = list_objects(base, include=["*.txt"])
        assert dead == [] and [(o.uri, o.size) for o in objects] == [
            (f"{base}a.txt", 1), (f"{base}skip/e.txt", 1), (f"{base}sub/c.txt", 3)]
        assert all(o.fingerprint.startswith(f"size:{o.size}:mtime:") for o in objects)
        assert object_fingerprint(f"{base}sub/c.txt") == objects[2].fingerprint
        [one], dead = list_objects(f"{base}sub/c.txt")
        assert dead == [] and (one.uri, one.fingerprint) == (objects[2].uri, objects[2].fingerprint)
        units, dead, status = expand_object(one, ExpandSettings())
        assert status == "ok" and [u.text for u in units] == ["ccc"]
    finally:
        server.shutdown()
        server.server_close()


def _same_as_listing(uri: str, storage_options=None) -> str:
    """The listing's fingerprint of uri, checked equal to object_fingerprint's and read_with_fingerprint's."""
    listed = {o.uri: o.fingerprint for o in list_objects(uri, storage_options=storage_options)[0]}[uri]
    data, read_fp = read_with_fingerprint(uri, storage_options)
    assert object_fingerprint(uri, storage_options) == read_fp == listed
    assert data == open_uri(uri, storage_options)
    return listed


def test_one_object_fingerprint_equals_the_listings(tmp_path: Path, monkeypatch, moto_s3) -> None:
    """The query compares a source's fingerprint now with the one listed at ingestion: same function, same value."""
    root = _tree(tmp_path)
    first = _same_as_listing(str(root / "sub/c.txt"))
    (root / "sub/c.txt").write_bytes(b"cccc")
    assert _same_as_listing(str(root / "sub/c.txt")) != first
    fs = fsspec.filesystem("memory")
    fs.pipe("/mfp/one.txt", b"one")
    assert _same_as_listing("memory:///mfp/one.txt").startswith("size:3:mtime:")
    monkeypatch.setattr(listing, "info_fingerprint", lambda info: None)  # a store that reports nothing
    monkeypatch.setattr(reading, "info_fingerprint", lambda info: None)
    assert _same_as_listing("memory:///mfp/one.txt") == "sha256:" + hashlib.sha256(b"one").hexdigest()
    monkeypatch.undo()
    fs.rm("/mfp", recursive=True)
    client, opts = moto_s3["client"], moto_s3["storage_options"]
    client.create_bucket(Bucket="fp-bucket")
    client.put_object(Bucket="fp-bucket", Key="k/a.txt", Body=b"alpha")
    assert _same_as_listing("s3://fp-bucket/k/a.txt", opts) == "etag:" + hashlib.md5(b"alpha").hexdigest()
    client.put_object(Bucket="fp-bucket", Key="k/a.txt", Body=b"beta")  # overwritten: seen at once, no stale cache
    assert _same_as_listing("s3://fp-bucket/k/a.txt", opts) == "etag:" + hashlib.md5(b"beta").hexdigest()
    with pytest.raises(FileNotFoundError):
        object_fingerprint("s3://fp-bucket/k/gone.txt", opts)
    with pytest.raises(FileNotFoundError):
        read_with_fingerprint(str(root / "gone.txt"))


# ---- S3 through a real HTTP server (moto) ----


def test_s3_listing_etag_globs_and_read(moto_s3) -> None:
    client, opts = moto_s3["client"], moto_s3["storage_options"]
    client.create_bucket(Bucket="list-bucket")
    contents = {"data/a.txt": b"alpha", "data/img/b.png": b"png!", "data/img/c.jpg": b"jpg", "data2/z.txt": b"z", "top.txt": b"t"}
    for key, body in contents.items():
        client.put_object(Bucket="list-bucket", Key=key, Body=body)
    objects, dead = list_objects("s3://list-bucket/data", storage_options=opts)
    assert dead == []
    assert [o.uri for o in objects] == ["s3://list-bucket/data/a.txt", "s3://list-bucket/data/img/b.png", "s3://list-bucket/data/img/c.jpg"]
    assert objects[0].fingerprint == "etag:" + hashlib.md5(b"alpha").hexdigest()
    assert objects[0].size == 5 and objects[0].mtime is not None
    pngs, _ = list_objects("s3://list-bucket/", include=["img/*.png", "*.png"], storage_options=opts)
    assert [o.uri for o in pngs] == ["s3://list-bucket/data/img/b.png"]
    assert open_uri("s3://list-bucket/data/img/c.jpg", opts) == b"jpg"
    # A folder pattern excludes the folder, on S3 as in a local walk.
    for folder in ("img/", "img"):
        kept, _ = list_objects("s3://list-bucket/data", exclude=[folder], storage_options=opts)
        assert [o.uri for o in kept] == ["s3://list-bucket/data/a.txt"], folder
    single, _ = list_objects("s3://list-bucket/top.txt", storage_options=opts)
    assert [o.uri for o in single] == ["s3://list-bucket/top.txt"]
    # a new object shows up on the next listing (no stale listing cache)
    client.put_object(Bucket="list-bucket", Key="data/new.txt", Body=b"n")
    assert len(list_objects("s3://list-bucket/data", storage_options=opts)[0]) == 4
    assert list_objects("s3://list-bucket/nothing-here", storage_options=opts) == ([], [])


def test_s3_keys_with_double_colons_read_and_folder_markers_are_not_objects(moto_s3) -> None:
    """S3 allows "::" in a key, which fsspec reads as a URL chain unless the URL has one protocol;
    the empty "folder/" keys that consoles create are not objects to ingest or count."""
    client, opts = moto_s3["client"], moto_s3["storage_options"]
    client.create_bucket(Bucket="odd-keys")
    for key, body in {"a::b.txt": b"double colon", "dir/": b"", "dir/x::y/z.txt": b"deeper"}.items():
        client.put_object(Bucket="odd-keys", Key=key, Body=body)
    objects, dead = list_objects("s3://odd-keys", storage_options=opts)
    assert dead == [] and [o.uri for o in objects] == ["s3://odd-keys/a::b.txt", "s3://odd-keys/dir/x::y/z.txt"]
    assert open_uri("s3://odd-keys/a::b.txt", opts) == b"double colon"
    assert open_uri("s3://odd-keys/dir/x::y/z.txt", opts) == b"deeper"
    fs, path = fs_for("simplecache::s3://odd-keys/a.txt", {"s3": opts})  # a real chain is still one
    assert "simplecache" in fs.protocol and path == "odd-keys/a.txt"


def test_s3_missing_bucket_raises(moto_s3) -> None:
    with pytest.raises(FileNotFoundError):
        list_objects("s3://no-such-bucket-xyz/prefix", storage_options=moto_s3["storage_options"])


def test_s3_endpoint_from_client_kwargs(moto_s3) -> None:
    client = moto_s3["client"]
    client.create_bucket(Bucket="kw-bucket")
    client.put_object(Bucket="kw-bucket", Key="k.txt", Body=b"k")
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto_s3["endpoint_url"]}}
    assert [o.uri for o in list_objects("s3://kw-bucket", storage_options=opts)[0]] == ["s3://kw-bucket/k.txt"]


def test_a_zero_byte_key_named_like_the_folder_is_its_marker_not_the_source(moto_s3) -> None:
    """A key "pfx" beside "pfx/a.txt" (an s3fs-fuse or console folder marker) once made s3://b/pfx/ list
    as that one empty object, and --prune then deleted the points of every object in the folder."""
    client, opts = moto_s3["client"], moto_s3["storage_options"]
    client.create_bucket(Bucket="marker")
    for key, body in {"pfx/a.txt": b"alpha", "pfx/sub/b.txt": b"bravo", "pfx": b"", "solo": b"", "full": b"x",
                      "full/c.txt": b"charlie"}.items():
        client.put_object(Bucket="marker", Key=key, Body=body)
    want = ["s3://marker/pfx/a.txt", "s3://marker/pfx/sub/b.txt"]
    for uri in ("s3://marker/pfx/", "s3://marker/pfx"):
        objects, dead = list_objects(uri, storage_options=opts)
        assert dead == [] and [o.uri for o in objects] == want, uri
    # A key with nothing under it is still one object, empty or not; a non-empty one stays one object.
    assert [o.uri for o in list_objects("s3://marker/solo", storage_options=opts)[0]] == ["s3://marker/solo"]
    assert [o.uri for o in list_objects("s3://marker/full", storage_options=opts)[0]] == ["s3://marker/full"]
    assert [o.uri for o in list_objects("s3://marker/full/", storage_options=opts)[0]] == ["s3://marker/full/c.txt"]


def test_a_file_name_cannot_forge_console_lines(tmp_path: Path) -> None:
    """A newline or an escape sequence in a listed name is shown escaped, in the plan and the run's summary."""
    from operators.media.listing import shown_path
    from pipelines.report import RunReport

    name = "a\nlisted 0 objects\x1b[2K.txt"
    (tmp_path / name).write_text("x")
    [obj], _ = list_objects(str(tmp_path))
    assert obj.uri.endswith(name)  # listed under its real name
    assert shown_path(obj.uri) == str(tmp_path / "a\\nlisted 0 objects\\x1b[2K.txt")
    assert shown_path("caf\udce9 é\u0085") == "caf\\xe9 é\\x85"  # a non-UTF-8 byte, a C1 control
    report = RunReport("r", "c", str(tmp_path), "m")
    report.dead_letters.append({"uri": obj.uri, "stage": "expand", "error_type": "E", "message": "bad\nline"})
    lines = report.summary().splitlines()
    assert lines[-1] == f"    {tmp_path}/a\\nlisted 0 objects\\x1b[2K.txt: expand: E: bad\\nline"


@pytest.mark.parametrize(("include", "exclude", "expected"), [
    (["latest/**"], None, ["latest/a.jpg", "latest/raw/b.cr2"]),
    (["latest/*"], None, ["latest/a.jpg", "latest/raw/b.cr2"]),
    (None, ["archive/2024/raw"], ["archive/2024/a.jpg", "latest/raw/b.cr2"]),
    (None, None, ["archive/2024/a.jpg", "archive/2024/raw/b.cr2"]),
])
def test_patterns_select_a_linked_folders_files_by_the_path_it_is_reached_by(tmp_path: Path, include, exclude,
                                                                              expected) -> None:
    # Walked once at its real place, a folder whose files the patterns left out there was not walked
    # again through the link that selects them: "latest/**" listed nothing.
    (tmp_path / "archive" / "2024" / "raw").mkdir(parents=True)
    (tmp_path / "archive" / "2024" / "a.jpg").write_bytes(b"a")
    (tmp_path / "archive" / "2024" / "raw" / "b.cr2").write_bytes(b"b")
    os.symlink(tmp_path / "archive" / "2024", tmp_path / "latest")
    objects, dead = list_objects(str(tmp_path), include=include, exclude=exclude)
    assert [os.path.relpath(o.uri, tmp_path) for o in objects] == expected and not dead


def test_patterns_keep_the_paths_the_walk_gives_without_them_and_joined_links_stay_cheap(tmp_path: Path) -> None:
    """With patterns a linked folder is walked again by other paths, but after every first walk (an
    alias link sorting first took files away from their plain path), and by at most 8 paths (a chain
    of folders each linking twice to the next cost 2^depth walks)."""
    import time

    ext = tmp_path / "ext"
    (ext / "shared").mkdir(parents=True)
    (ext / "shared" / "x.jpg").write_bytes(b"x")
    src = tmp_path / "src"
    (src / "photos").mkdir(parents=True)
    os.symlink(ext / "shared", src / "photos" / "shared")
    os.symlink(src / "photos", src / "alias")  # sorts before "photos"
    plain = [os.path.relpath(o.uri, src) for o in list_objects(str(src))[0]]
    assert plain == ["photos/shared/x.jpg"]
    assert [os.path.relpath(o.uri, src) for o in list_objects(str(src), exclude=["*.tmp"])[0]] == plain

    chain = tmp_path / "chain"
    depth = 18
    for i in range(depth + 1):
        (chain / f"d{i}").mkdir(parents=True)
        (chain / f"d{i}" / f"f{i}.jpg").write_bytes(b"f")
    for i in range(depth):
        os.symlink(chain / f"d{i + 1}", chain / f"d{i}" / "a")
        os.symlink(chain / f"d{i + 1}", chain / f"d{i}" / "b")
    started = time.monotonic()
    objects, dead = list_objects(str(chain / "d0"), include=["*.jpg"])
    assert time.monotonic() - started < 20  # 2^18 walks took minutes
    assert sorted(os.path.basename(o.uri) for o in objects) == sorted(f"f{i}.jpg" for i in range(depth + 1))


def test_a_link_into_a_skipped_folder_is_not_walked_and_a_skip_holding_the_source_skips_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "out" / "run1").mkdir(parents=True)
    (src / "out" / "run1" / "results.jsonl").write_text("{}")
    (src / "a.txt").write_text("a")
    os.symlink(src / "out" / "run1", src / "last_run")
    for include in (None, ["*"]):
        objects, _ = list_objects(str(src), include=include, skip=[str(src / "out")])
        assert [os.path.relpath(o.uri, src) for o in objects] == ["a.txt"], include
    objects, _ = list_objects(str(src), skip=[str(tmp_path)])  # output.dir ".." of the source
    assert sorted(os.path.relpath(o.uri, src) for o in objects) == ["a.txt", "out/run1/results.jsonl"]
