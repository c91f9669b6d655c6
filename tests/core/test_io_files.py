"""Opening and listing files below a directory that someone else may have made (savepoint.io.files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from savepoint._hashing import hash_file, hash_inside
from savepoint._json import read_json_inside
from savepoint.errors import CorruptCheckpointError, SavepointError, UnsafeCheckpointError
from savepoint.io.files import (
    DIRECTORY,
    FILE,
    OTHER,
    SYMLINK,
    list_dir_inside,
    open_fd_inside,
    read_bytes_inside,
    walk_inside,
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{a.json, sub/b.txt, link-file -> outside, link-dir -> outside dir, fifo}, and outside/."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_text('{"x": 1}')
    (root / "sub" / "b.txt").write_text("b")
    os.symlink(outside / "secret", root / "link-file")
    os.symlink(outside, root / "link-dir")
    os.mkfifo(root / "fifo")
    return root


def test_listing_reports_links_and_special_files_without_following(tree: Path) -> None:
    assert list_dir_inside(str(tree)) == [
        ("a.json", FILE),
        ("fifo", OTHER),
        ("link-dir", SYMLINK),
        ("link-file", SYMLINK),
        ("sub", DIRECTORY),
    ]
    walked = dict(walk_inside(str(tree)))
    assert walked["sub/b.txt"] == FILE and not any(rel.startswith("link-dir/") for rel in walked)


def test_walk_prunes_and_refuses_depth(tree: Path) -> None:
    assert "sub/b.txt" not in dict(walk_inside(str(tree), skip=lambda rel: rel == "sub"))
    Path(tree, *["d"] * 5).mkdir(parents=True)
    with pytest.raises(UnsafeCheckpointError, match="deeper than 3"):
        list(walk_inside(str(tree), max_depth=3))


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("rel", "error"),
    [
        ("link-file", UnsafeCheckpointError),
        ("link-dir/secret", UnsafeCheckpointError),
        ("fifo", UnsafeCheckpointError),
        ("sub", UnsafeCheckpointError),
        ("../outside/secret", UnsafeCheckpointError),
        ("/etc/hostname", UnsafeCheckpointError),
        ("missing", FileNotFoundError),
    ],
)
def test_open_refuses_what_is_not_a_regular_file_inside(tree: Path, rel: str, error: type) -> None:
    with pytest.raises(error):
        open_fd_inside(str(tree), rel)


def test_sizes_are_checked_before_reading(tree: Path) -> None:
    assert read_bytes_inside(str(tree), "sub/b.txt", max_bytes=1) == b"b"
    with pytest.raises(CorruptCheckpointError, match="more than the 4 allowed"):
        read_bytes_inside(str(tree), "a.json", max_bytes=4)


def test_json_reads_are_capped_and_confined(tree: Path) -> None:
    def fail(reason: str) -> SavepointError:
        return SavepointError(f"a.json: {reason}")

    assert read_json_inside(str(tree), "a.json", fail) == {"x": 1}
    with pytest.raises(SavepointError, match="more than the 4 allowed"):
        read_json_inside(str(tree), "a.json", fail, max_bytes=4)
    with pytest.raises(UnsafeCheckpointError):
        read_json_inside(str(tree), "link-file", fail)


def test_hash_inside_matches_hash_file(tree: Path) -> None:
    assert hash_inside(str(tree), "a.json") == hash_file(tree / "a.json")
