"""dpnb.io under faults: a full disk while writing, files damaged after they were written, and the
temporary files a killed writer leaves."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from matplotlib.figure import Figure

from dpnb import io
from dpnb.errors import DpnbError
from dpnb.io import (
    DamagedFile,
    atomic_directory,
    cached,
    load_torch_verified,
    read_json,
    remove_stale_temporaries,
    save_figure,
    save_torch_atomic,
    write_json_atomic,
)


def fill_the_disk(monkeypatch) -> None:
    """From now on every fsync fails as on a full disk (ENOSPC): the data never reaches the device."""
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", no_space)


def one_line_about(exc: BaseException, directory, name: str, mib: str) -> None:
    message = str(exc)
    assert "\n" not in message and message.startswith(f"no space left on the device holding {directory}")
    assert f"while writing {name} ({mib} MiB)" in message and f"Free at least {mib} MiB there" in message


def test_a_full_disk_keeps_the_previous_file_and_says_what_to_free(tmp_path, monkeypatch):
    write_json_atomic(tmp_path / "metrics.json", {"accuracy": 0.5})
    fill_the_disk(monkeypatch)
    big = {"values": list(range(300_000))}
    with pytest.raises(DpnbError) as caught:
        write_json_atomic(tmp_path / "metrics.json", big)
    one_line_about(caught.value, tmp_path, "metrics.json", f"{len(io.to_json(big)) / 2**20:.1f}")
    assert read_json(tmp_path / "metrics.json") == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_a_full_disk_while_saving_tensors_or_a_figure_or_a_directory(tmp_path, monkeypatch):
    save_torch_atomic(tmp_path / "latest.pt", {"w": torch.zeros(4)})
    fill_the_disk(monkeypatch)
    with pytest.raises(DpnbError) as caught:
        save_torch_atomic(tmp_path / "latest.pt", {"w": torch.ones(2**20)})  # 4 MiB of weights
    one_line_about(caught.value, tmp_path, "latest.pt", "4.0")
    assert torch.equal(load_torch_verified(tmp_path / "latest.pt")["w"], torch.zeros(4))

    figure = Figure()
    figure.subplots().plot([0, 1])
    with pytest.raises(DpnbError, match="while writing loss.png"):
        save_figure(figure, tmp_path / "loss.png")

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "old.txt").write_text("kept")
    with pytest.raises(DpnbError) as caught, atomic_directory(tmp_path / "data") as staging:
        (staging / "train.arrow").write_bytes(b"x" * 3 * 2**20)
        raise OSError(errno.ENOSPC, "No space left on device")  # as the writer filling it would
    one_line_about(caught.value, tmp_path, "data/", "3.0")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "latest.pt"]


def test_a_damaged_tensor_file_is_never_loaded(tmp_path):
    state = {"format": 1, "weights": torch.arange(50_000, dtype=torch.float32), "meta": {"records": "abc"}}
    path = save_torch_atomic(tmp_path / "state.pt", state)
    loaded = load_torch_verified(path)
    assert torch.equal(loaded["weights"], state["weights"]) and loaded["meta"] == state["meta"]
    data = path.read_bytes()

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10  # inside the weights: torch.load alone returns them changed, silently
    path.write_bytes(flipped)
    assert not torch.equal(torch.load(path)["weights"], state["weights"])
    with pytest.raises(DamagedFile, match=r"state.pt is damaged \(its contents do not match the checksum"):
        load_torch_verified(path)

    path.write_bytes(data[: len(data) - 100])  # truncated
    with pytest.raises(DamagedFile, match=r"state.pt is damaged \(unreadable"):
        load_torch_verified(path)

    torch.save(state, path)  # no checksum: cannot be verified, so not used either
    with pytest.raises(DamagedFile, match="holds no checksum"):
        load_torch_verified(path)


def test_damaged_json_is_one_line_and_a_damaged_cached_piece_is_computed_again(tmp_path, capsys):
    path = tmp_path / "privacy.json"
    write_json_atomic(path, {"epsilon": 8.0, "steps": 32})
    path.write_text(path.read_text()[:15])
    with pytest.raises(DamagedFile) as caught:
        read_json(path)
    assert "\n" not in str(caught.value) and "privacy.json is damaged (not valid JSON" in str(caught.value)
    assert "rerun the stage that writes it with --force" in str(caught.value)

    piece = tmp_path / "evaluate" / "real.json"
    assert cached(piece, "k", lambda: {"accuracy": 0.7}) == {"accuracy": 0.7}
    piece.write_bytes(piece.read_bytes()[:-9])
    assert cached(piece, "k", lambda: {"accuracy": 0.8}) == {"accuracy": 0.8}  # recomputed, not misread
    assert "real.json is damaged" in capsys.readouterr().out
    assert json.loads(piece.read_text())["result"] == {"accuracy": 0.8}


def test_stale_temporaries_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".data.x1y2.tmp" / "train").mkdir(parents=True)
    (tmp_path / ".data.x1y2.tmp" / "train" / ".manifest.json.ab12.tmp").write_text("{")
    (tmp_path / "synthetic" / "shards").mkdir(parents=True)
    (tmp_path / "synthetic" / "shards" / ".shard-00001.jsonl.k3l4.tmp").write_text("[")
    (tmp_path / ".model.old").mkdir()
    kept = ["config.yaml", "synthetic/shards/shard-00000.jsonl", ".hidden", "notes.tmp"]
    for name in kept:
        (tmp_path / name).write_text("x")
    assert remove_stale_temporaries(tmp_path) == 3
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(kept)
