"""`xtra data prepare` and the class-folder listing with symbolic links (fast, no Ray):
nothing is written through a link below --dest, and a source is listed without loops."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from pipelines.data.commands import prepare
from pipelines.data.listing import list_split
from pipelines.errors import UserError
from tests.data.test_data import write_tree
from tests.data.test_shards import distinct_dataset
from xtra_core.config import DataConfig


def files_below(folder) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(folder) for n in names)


@pytest.mark.parametrize("linked", ["train", "train/ant"])
def test_prepare_refuses_a_dest_folder_that_is_a_symlink(tmp_path, linked: str) -> None:
    src, dest, outside = tmp_path / "src", tmp_path / "dest", tmp_path / "outside"
    write_tree(str(src), distinct_dataset(8, 2))
    outside.mkdir()
    (dest / linked).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, dest / linked)
    with pytest.raises(UserError, match=f"{dest / linked}: is a symbolic link"):
        prepare(str(src), str(dest))
    assert files_below(outside) == []  # nothing written outside --dest


def test_prepare_into_real_folders_writes_every_image(tmp_path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_tree(str(src), distinct_dataset(8, 2))
    assert prepare(str(src), str(dest)) == {"train": 8, "test": 2}


def test_a_symlink_loop_in_the_source_lists_each_image_once(tmp_path) -> None:
    src = tmp_path / "src"
    write_tree(str(src), distinct_dataset(8, 2))
    os.symlink(src / "train", src / "train" / "ant" / "loop")  # train/ant/loop -> train
    os.symlink(src / "train" / "ant", src / "train" / "ant2")  # a second link to one folder
    listing = list_split(DataConfig(uri=str(src)), "train")
    counts = Counter(os.path.realpath(p) for p in listing.table.column("path").to_pylist())
    assert len(listing) == 8 and set(counts.values()) == {1}


def test_a_symlinked_class_folder_is_followed_once(tmp_path) -> None:
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    write_tree(str(src), distinct_dataset(8, 2))
    os.rename(src / "train" / "bee", elsewhere)
    os.symlink(elsewhere, src / "train" / "bee")  # a class kept on another disk, linked in
    listing = list_split(DataConfig(uri=str(src)), "train")
    assert len(listing) == 8 and listing.class_counts() == {"ant": 4, "bee": 4}
