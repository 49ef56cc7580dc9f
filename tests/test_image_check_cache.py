"""data.check_cache: the image check remembers (file, size, mtime) -> ok/problem, so a second start skips the decode."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from ftlab.data import ImageFolderDataModule, image_check
from ftlab.data.image_check import CACHE_NAME, CheckCache, find_bad_images
from ftlab.distributed import local_rank
from ftlab.errors import UserError
from helpers import make_imagefolder


class Decodes:
    """Records calls of the decode function, wrapping the real one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        self._lock = threading.Lock()
        real = image_check.image_problem

        def counted(path: str) -> str | None:
            with self._lock:
                self.paths.append(path)
            return real(path)

        monkeypatch.setattr(image_check, "image_problem", counted)

    def take(self) -> list[str]:
        out, self.paths = self.paths, []
        return out


def _backdate(root: Path, seconds: int = 3600) -> None:
    """Files of a dataset that is not being written: older than the check's racy window."""
    old = time.time_ns() - seconds * 10**9
    if root.is_file():
        os.utime(root, ns=(old, old))
    for dirpath, _, names in os.walk(root):
        for name in names:
            os.utime(Path(dirpath) / name, ns=(old, old))


def _data(tmp_path: Path, per_class: int = 4) -> Path:
    root = make_imagefolder(tmp_path / "d", per_class=per_class, splits=("train", "test"))
    _backdate(root)
    return root


def _images(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.png"))


def _start(root: Path, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(str(root), num_workers=0, **kwargs)
    dm.discover()
    return dm


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Decodes:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    return Decodes(monkeypatch)


def test_second_start_decodes_nothing(tmp_path: Path, decodes: Decodes) -> None:
    root = _data(tmp_path)
    first = _start(root)
    assert sorted(decodes.take()) == _images(root)
    cache = json.loads((root / CACHE_NAME).read_text())
    assert set(cache["entries"]) == {os.path.relpath(p, root) for p in _images(root)}
    assert all(e[2] is None and e[3] == 0 for e in cache["entries"].values())

    second = _start(root)
    assert decodes.take() == []
    assert second._splits == first._splits
    # Nothing changed: the file is not even rewritten.
    assert json.loads((root / CACHE_NAME).read_text()) == cache


def test_changed_new_and_removed_files(tmp_path: Path, decodes: Decodes) -> None:
    root = _data(tmp_path)
    _start(root)
    decodes.take()
    touched, replaced, removed = (root / "train" / "cat" / f"00{i}.png" for i in range(3))
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, another mtime
    added = root / "train" / "dog" / "new.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(added)
    removed.unlink()
    _backdate(added)

    _start(root)
    assert sorted(decodes.take()) == sorted([str(touched), str(added)])
    entries = json.loads((root / CACHE_NAME).read_text())["entries"]
    assert "train/dog/new.png" in entries and "train/cat/002.png" not in entries

    # Garbage in place of a good image (another size and mtime): caught, named in one line, remembered as bad.
    replaced.write_bytes(b"\xff\xd8 not a png any more")
    _backdate(replaced, seconds=1800)
    with pytest.raises(UserError, match=r"train/cat/001.png: unreadable image") as err:
        _start(root)
    assert "\n" not in str(err.value)
    assert decodes.take() == [str(replaced)]
    assert json.loads((root / CACHE_NAME).read_text())["entries"]["train/cat/001.png"][2]


def test_bad_files_are_remembered_as_bad(tmp_path: Path, decodes: Decodes, caplog: pytest.LogCaptureFixture) -> None:
    root = _data(tmp_path)
    bad = root / "train" / "fox" / "empty.png"
    bad.write_bytes(b"")
    _backdate(bad)
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        first = _start(root, on_bad_image="skip")
    assert len(decodes.take()) == len(_images(root))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        second = _start(root, on_bad_image="skip")
    assert decodes.take() == []
    (warning,) = [r.getMessage() for r in caplog.records if "on_bad_image=skip" in r.getMessage()]
    assert f"skipped 1 of {len(_images(root))} images: {bad} (" in warning
    assert second._splits == first._splits
    with pytest.raises(UserError, match=rf"^{bad}: unreadable image \(UnidentifiedImageError"):
        _start(root, on_bad_image="error")
    assert decodes.take() == []


def test_a_file_changed_during_the_check_window_is_checked_again(tmp_path: Path, decodes: Decodes) -> None:
    root = _data(tmp_path)
    fresh = root / "train" / "cat" / "000.png"
    os.utime(fresh)  # now: a second change in the same clock tick would keep size and mtime
    _start(root)
    decodes.take()
    assert json.loads((root / CACHE_NAME).read_text())["entries"]["train/cat/000.png"][3] == 1
    _start(root)
    assert decodes.take() == [str(fresh)]


CORRUPT = {
    "truncated json": lambda text: text[: len(text) // 2],
    "binary": lambda text: "\x00\xff\xfe garbage",
    "a list": lambda text: "[1, 2, 3]",
    "other format": lambda text: text.replace('"format":1', '"format":99'),
    "wrong entry types": lambda text: json.dumps({**json.loads(text), "entries": {"train/cat/000.png": [1, "x", None, 0]}}),
    "negative size": lambda text: json.dumps({**json.loads(text), "entries": {"train/cat/000.png": [-1, 5, None, 0]}}),
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_cache_is_ignored_with_one_warning_and_rebuilt(
    tmp_path: Path, decodes: Decodes, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    root = _data(tmp_path)
    _start(root)
    decodes.take()
    path = root / CACHE_NAME
    path.write_bytes(CORRUPT[kind](path.read_text()).encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        _start(root)
    warnings = [r.getMessage() for r in caplog.records if "image-check cache" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0] and "\n" not in warnings[0]
    assert sorted(decodes.take()) == _images(root)  # nothing trusted from it
    _start(root)
    assert decodes.take() == []  # rebuilt


def test_another_bomb_limit_checks_again(tmp_path: Path, decodes: Decodes, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _data(tmp_path)
    _start(root)
    decodes.take()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 20x20 images are now over it
    with pytest.raises(UserError, match="decompression-bomb limit of 300 pixels"):
        _start(root)
    assert len(decodes.take()) == len(_images(root))


def test_key_off_writes_no_cache(tmp_path: Path, decodes: Decodes) -> None:
    root = _data(tmp_path)
    for _ in range(2):
        _start(root, check_cache=False, check_cache_dir=str(tmp_path / "out"))
        assert len(decodes.take()) == len(_images(root))
    assert not (root / CACHE_NAME).exists() and not (tmp_path / "out").exists()


def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: report the folder the way a read-only mount would
        real = os.access
        monkeypatch.setattr(image_check.os, "access",
                            lambda p, mode, **kw: False if Path(p) == folder and mode & os.W_OK else real(p, mode, **kw))


def test_read_only_data_falls_back_to_the_output_root(
    tmp_path: Path, decodes: Decodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _data(tmp_path)
    _read_only(monkeypatch, root)
    out = tmp_path / "outputs" / "image_check"
    try:
        _start(root, check_cache_dir=str(out))
        assert len(decodes.take()) == len(_images(root))
        _start(root, check_cache_dir=str(out))
        assert decodes.take() == []
        (cache,) = out.iterdir()
        assert cache.name.startswith("d-") and cache.suffix == ".json"
        assert not (root / CACHE_NAME).exists()
        # No fallback configured: the check runs, nothing is remembered, nothing fails.
        _start(root)
        _start(root)
        assert len(decodes.take()) == 2 * len(_images(root))
    finally:
        root.chmod(0o755)


def test_write_failure_beside_the_data_moves_to_the_fallback(
    tmp_path: Path, decodes: Decodes, caplog: pytest.LogCaptureFixture
) -> None:
    root = _data(tmp_path)
    (root / CACHE_NAME).mkdir()  # os.replace onto a directory fails, even for root
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        cache = CheckCache(root, out)
        assert find_bad_images(_images(root), cache, leader=True) == []
    assert any("could not write the image-check cache" in r.getMessage() for r in caplog.records)
    assert cache.path is not None and cache.path.parent == out and cache.path.exists()


# -- several processes ------------------------------------------------------------------------------
def test_local_rank_from_the_launchers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LOCAL_RANK", "SLURM_LOCALID", "JSM_NAMESPACE_LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert local_rank() == 2
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_rank() == 1


def test_other_ranks_wait_for_local_rank_0_and_decode_nothing(
    tmp_path: Path, decodes: Decodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _data(tmp_path)
    bad = root / "train" / "dog" / "notes.png"
    bad.write_text("not an image\n")
    _backdate(bad)
    paths = _images(root)
    waiting = threading.Event()

    def pause(seconds: float) -> None:
        waiting.set()  # the follower found no answers and is waiting for them
        time.sleep(0.01)

    monkeypatch.setattr(image_check, "_pause", pause)
    got: dict[str, list] = {}
    follower = threading.Thread(
        name="follower", target=lambda: got.update(bad=find_bad_images(paths, CheckCache(root), leader=False)))
    follower.start()
    assert waiting.wait(30)
    before = list(decodes.paths)
    leader = find_bad_images(paths, CheckCache(root), leader=True)
    follower.join(30)
    assert not follower.is_alive()
    assert before == []
    assert sorted(decodes.take()) == paths  # each image decoded once, by the leader
    assert got["bad"] == leader and [p for p, _ in leader] == [str(bad)]


def test_a_rank_through_the_environment_reads_the_cache_and_writes_nothing(
    tmp_path: Path, decodes: Decodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _data(tmp_path)
    first = _start(root)
    decodes.take()
    before = (root / CACHE_NAME).stat().st_mtime_ns
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _start(root)._splits == first._splits
    assert decodes.take() == []
    assert (root / CACHE_NAME).stat().st_mtime_ns == before


def test_a_rank_checks_by_itself_when_the_cache_stalls(
    tmp_path: Path, decodes: Decodes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = _data(tmp_path)
    monkeypatch.setattr(image_check, "WAIT_STALL_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        assert find_bad_images(_images(root), CheckCache(root), leader=False) == []
    assert any("has not changed" in r.getMessage() for r in caplog.records)
    assert sorted(decodes.take()) == _images(root)
    assert not (root / CACHE_NAME).exists()  # only local rank 0 writes


def _leader_run(root: str) -> None:
    for _ in range(5):
        find_bad_images(sorted(str(p) for p in Path(root).rglob("*.png")), CheckCache(root), leader=True)
        # Forget it, so the next round decodes and writes again.
        Path(root, CACHE_NAME).unlink(missing_ok=True)
        find_bad_images(sorted(str(p) for p in Path(root).rglob("*.png")), CheckCache(root), leader=True)


def test_runs_starting_together_leave_a_valid_cache(tmp_path: Path, decodes: Decodes) -> None:
    root = _data(tmp_path, per_class=6)
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_leader_run, args=(str(root),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    _start(root)
    assert decodes.take() == []  # the file the last writer left is whole and answers for every image


def test_an_interrupted_check_keeps_what_it_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _data(tmp_path)
    real = image_check.image_problem
    calls: list[str] = []

    def stopped(path: str) -> str | None:
        calls.append(path)
        if path.endswith("train/dog/001.png"):
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(image_check, "image_problem", stopped)
    monkeypatch.setattr(image_check, "THREADS", 1)  # in order: everything before dog/001 was decoded
    with pytest.raises(KeyboardInterrupt):
        _start(root)
    kept = json.loads((root / CACHE_NAME).read_text())["entries"]
    assert kept and "train/dog/001.png" not in kept
    calls.clear()
    monkeypatch.setattr(image_check, "image_problem", lambda p: calls.append(p) or real(p))
    _start(root)
    assert sorted(calls) == sorted(p for p in _images(root) if os.path.relpath(p, root) not in kept)


def test_a_long_check_writes_its_progress(tmp_path: Path, decodes: Decodes, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _data(tmp_path)
    sizes: list[int] = []
    real_save = CheckCache.save

    def save(self: CheckCache, entries: dict) -> None:
        sizes.append(len(entries))
        real_save(self, entries)

    monkeypatch.setattr(CheckCache, "save", save)
    monkeypatch.setattr(image_check, "SAVE_EVERY_S", -1.0)  # a save after every decode
    monkeypatch.setattr(image_check, "THREADS", 1)
    _start(root)
    n = len(_images(root))
    # Written after the first decode already (later saves are spaced out by ten times a save's duration).
    assert sizes[0] == 1 and sizes[-1] == n and sizes == sorted(sizes)


@pytest.mark.slow
@pytest.mark.cli
def test_under_ddp_only_local_rank_0_decodes(tmp_path: Path) -> None:
    """A real two-process DDP run: Lightning's rank 1 re-runs the command and reads the parent's answers."""
    import subprocess
    import sys

    from helpers import ONE_THREAD_ENV, TINY_MODEL

    root = _data(tmp_path, per_class=9)
    env = {**os.environ, **ONE_THREAD_ENV, "FTLAB_OUTPUT_DIR": str(tmp_path / "outputs"),
           "FTLAB_DATA_DIR": str(tmp_path / "data")}
    env.pop("LOCAL_RANK", None)
    args = ["data=imagefolder", f"data.root={root}", "data.batch_size=4", *TINY_MODEL, "trainer=ddp",
            "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_epochs=1", "data.num_workers=0",
            "method=full", "logger=none"]
    proc = subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr
    n = len(_images(root))
    assert f"image check: {n} of {n} images to decode" in proc.stderr, proc.stderr[-4000:]
    assert f"image check (local rank 1): 0 of {n} images to decode" in proc.stderr, proc.stderr[-4000:]
    assert (root / CACHE_NAME).is_file()
