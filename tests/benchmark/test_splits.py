"""kdml.benchmark.splits: group-disjoint, reproducible splits and their symlinked folders."""

import os

import pytest

from kdml.benchmark.splits import SplitFolders, class_folders, group_split
from tests.helpers import write_glyph_folder

NAMES = [f"alphabet{g}/char{c:02d}" for g in range(8) for c in range(3 + g)]


def _groups(names):
    return {n.split("/")[0] for n in names}


def test_split_is_class_and_group_disjoint_and_covers_every_class():
    split = group_split(NAMES, num_validation_groups=1, num_test_groups=2, seed=0)
    train, val, test = (set(split.classes[k]) for k in ("train", "validation", "test"))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(NAMES)
    assert set(split.classes["train+validation"]) == train | val
    assert _groups(train) == set(split.train_groups) and len(split.train_groups) == 5
    assert _groups(val) == set(split.validation_groups) and len(split.validation_groups) == 1
    assert _groups(test) == set(split.test_groups) and len(split.test_groups) == 2
    assert not (_groups(train) & _groups(val) or _groups(train) & _groups(test)
                or _groups(val) & _groups(test))


def test_split_is_a_pure_function_of_the_seed():
    first = group_split(NAMES, seed=3)
    assert group_split(list(reversed(NAMES)), seed=3) == first
    draws = {group_split(NAMES, seed=s).test_groups for s in range(10)}
    assert len(draws) > 1  # the seed matters
    assert first.fingerprint("test") == group_split(NAMES, seed=3).fingerprint("test")
    assert first.fingerprint("train") != first.fingerprint("test")


def test_named_test_groups_are_kept_whatever_the_seed():
    for seed in range(5):
        split = group_split(NAMES, test_groups=["alphabet7", "alphabet2"], seed=seed)
        assert split.test_groups == ("alphabet2", "alphabet7")
        assert "alphabet2" not in split.validation_groups + split.train_groups


def test_flat_class_names_give_a_plain_class_disjoint_split():
    names = [f"class{i}" for i in range(10)]
    split = group_split(names, num_validation_groups=2, num_test_groups=3, seed=1)
    assert [len(split.classes[k]) for k in ("train", "validation", "test")] == [5, 2, 3]


@pytest.mark.parametrize("kwargs, message", [
    (dict(test_groups=["nope"]), "test_groups"),
    (dict(num_test_groups=8), "num_test_groups"),
    (dict(num_validation_groups=6), "num_validation_groups"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_split(NAMES, **kwargs)


def test_split_folders_hold_exactly_the_split_classes(tmp_path):
    # Two roots sharing alphabet0/char00: the first root's folder is taken.
    first = write_glyph_folder(tmp_path / "a", num_classes=6, images_per_class=3,
                               class_dir=lambda c: f"alphabet{c // 2}/char{c % 2:02d}")
    second = write_glyph_folder(tmp_path / "b", num_classes=4, images_per_class=3, seed=5,
                                class_dir=lambda c: f"alphabet3/char{c - 1:02d}" if c
                                else "alphabet0/char00")
    folders = class_folders([first, second])
    assert len(folders) == 9  # 6 + 4 - 1 shared
    assert folders["alphabet0/char00"] == os.path.join(first, "alphabet0", "char00")
    split = group_split(sorted(folders), num_test_groups=1, seed=0)
    splits = SplitFolders(folders, split, str(tmp_path / "splits"))
    from kdml.data.sources.folder import load_folder

    for name in ("train", "validation", "train+validation", "test"):
        loaded = load_folder(splits.load_split(name), verify_images=False)
        assert loaded.class_names == split.classes[name]
    with pytest.raises(ValueError, match="Unknown split 'val'"):
        splits.load_split("val")


def test_a_split_over_renamed_but_different_files_gets_other_keys(tmp_path):
    """Issue 30: another copy of the data with the same class names must not reuse runs."""
    from kdml.benchmark.splits import with_contents

    first = write_glyph_folder(tmp_path / "a", num_classes=6, images_per_class=3,
                               class_dir=lambda c: f"alphabet{c // 2}/char{c % 2:02d}")
    folders = class_folders([first])
    split = group_split(sorted(folders), num_test_groups=1, seed=0)
    keyed = with_contents(split, folders)
    assert keyed.classes == split.classes and keyed == split  # same classes, same split
    fingerprints = {n: keyed.fingerprint(n) for n in ("train", "validation", "test")}
    assert all(fingerprints[n] != split.fingerprint(n) for n in fingerprints)  # files count
    # the same class names over other files: one image of a training class replaced by a
    # bigger file of the same name, another renamed
    name = keyed.classes["train"][0]
    folder = folders[name]
    image = sorted(os.listdir(folder))[0]
    with open(os.path.join(folder, image), "ab") as f:
        f.write(b"\0" * 17)
    changed = with_contents(split, folders)
    assert changed.fingerprint("train") != fingerprints["train"]
    assert changed.fingerprint("train+validation") != keyed.fingerprint("train+validation")
    assert changed.fingerprint("test") == fingerprints["test"]  # its files did not change
    other = sorted(os.listdir(folder))[1]
    os.rename(os.path.join(folder, other), os.path.join(folder, "renamed.png"))
    assert with_contents(split, folders).fingerprint("train") != changed.fingerprint("train")
    # the split folders are named by the fingerprint: the changed data gets its own
    old = SplitFolders(folders, keyed, str(tmp_path / "splits")).load_split("train")
    new = SplitFolders(folders, with_contents(split, folders), str(tmp_path / "splits")).load_split("train")
    assert old != new
