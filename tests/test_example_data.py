"""The example's data: AGIQA-3K reader and checks, prompt-grouped splits, synthetic domains."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.cnniqa_agiqa import agiqa, splits, synthetic

REAL_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "agiqa3k" / "data.csv"
PROMPTS = ["statue of a man", "a cat, watercolor style", "city at night, 4k", "a tray of sushi"]


def write_agiqa(root: Path, per_prompt: int = 3, size: int = 40, images: bool = True) -> list[str]:
    """A tiny AGIQA-3K-format folder: CRLF data.csv with quoted prompts, and JPEGs."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names, rows = [], []
    for p, prompt in enumerate(PROMPTS):
        for k in range(per_prompt):
            name = f"gen{k}_normal_{p:03d}.jpg"
            names.append(name)
            rows.append([name, prompt, "", "", "", f"{rng.uniform(0, 5):.6f}", "0.5", f"{rng.uniform(0, 5):.6f}", "0.4"])
            if images:
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / name, quality=90)
    with (root / "data.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow(agiqa.REQUIRED_COLUMNS)
        writer.writerows(rows)
    return names


def test_reader_handles_crlf_and_quoted_commas(tmp_path):
    write_agiqa(tmp_path)
    assert b"\r\n" in (tmp_path / "data.csv").read_bytes() and b'"a cat, watercolor style"' in (tmp_path / "data.csv").read_bytes()
    records = agiqa.read_csv(tmp_path / "data.csv", "quality")
    assert len(records) == 12
    assert {r.group for r in records} == set(PROMPTS)
    align = agiqa.read_csv(tmp_path / "data.csv", "align")
    assert [r.mos for r in records] != [r.mos for r in align]


@pytest.mark.skipif(not REAL_CSV.is_file(), reason="the real AGIQA-3K data.csv is not present")
def test_real_data_csv_parses():
    records = agiqa.read_csv(REAL_CSV, "quality")
    assert len(records) == 2982
    assert len({r.group for r in records}) == 300
    assert records[0].name == "AttnGAN_normal_000.jpg" and records[0].mos == pytest.approx(0.965602553)
    assert all(0 <= r.mos <= 5 for r in records)
    assert any("," in r.group for r in records)


def test_missing_columns_are_named(tmp_path):
    (tmp_path / "data.csv").write_text("name,prompt,mos_quality\r\na.jpg,x,1.0\r\n")
    with pytest.raises(ValueError, match="lacks the columns.*'adj1'.*'mos_align'"):
        agiqa.read_csv(tmp_path / "data.csv")


def test_bad_row_is_located(tmp_path):
    write_agiqa(tmp_path, images=False)
    lines = (tmp_path / "data.csv").read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[5], "n/a")
    (tmp_path / "data.csv").write_text("\r\n".join(lines) + "\r\n")
    with pytest.raises(ValueError, match=r"line 4 .*'mos_quality' is 'n/a'"):
        agiqa.read_csv(tmp_path / "data.csv")


def test_unquoted_comma_is_reported(tmp_path):
    header = ",".join(agiqa.REQUIRED_COLUMNS)
    (tmp_path / "data.csv").write_text(f"{header}\r\na.jpg,a cat, watercolor,,,,1.0,0.1,2.0,0.2\r\n")
    with pytest.raises(ValueError, match="line 2.*quote prompts"):
        agiqa.read_csv(tmp_path / "data.csv")


def test_out_of_range_mos_and_unknown_target(tmp_path):
    header = ",".join(agiqa.REQUIRED_COLUMNS)
    (tmp_path / "data.csv").write_text(f"{header}\r\na.jpg,p,,,,57.0,0.1,2.0,0.2\r\n")
    with pytest.raises(ValueError, match=r"outside the MOS range \[0, 5\]"):
        agiqa.read_csv(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="'quality' or 'align'"):
        agiqa.read_csv(tmp_path / "data.csv", "aesthetics")


def test_missing_folder_and_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        agiqa.load_agiqa(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="data.csv"):
        agiqa.load_agiqa(tmp_path)


def test_missing_images_counted_and_listed(tmp_path):
    names = write_agiqa(tmp_path, per_prompt=2)
    for name in names[:7]:
        (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"7 of 8 images .*missing.*" + names[0].replace(".", r"\.") + r".*\(2 more\)"):
        agiqa.load_agiqa(tmp_path)


def test_unreadable_images_counted_and_listed(tmp_path):
    names = write_agiqa(tmp_path, per_prompt=2)
    (tmp_path / names[3]).write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=r"1 of 8 images .*cannot be decoded: " + names[3].replace(".", r"\.")):
        agiqa.load_agiqa(tmp_path)
    assert len(agiqa.load_agiqa(tmp_path, decode=False)[0]) == 8


def test_truncated_jpeg_is_caught_before_training(tmp_path):
    """A JPEG cut short passes Image.verify() but cannot be decoded: the check must decode the pixels."""
    names = write_agiqa(tmp_path, per_prompt=2)
    for name in (names[1], names[5]):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"2 of 8 images .*cannot be decoded: " + names[1].replace(".", r"\.")
                       + ", " + names[5].replace(".", r"\.") + r" \(first: image file is truncated"):
        agiqa.load_agiqa(tmp_path)


def test_images_smaller_than_the_crop_are_caught_before_training(tmp_path):
    """The decode pass also checks sizes after --resize, so a small image fails here, not mid-training."""
    from PIL import Image

    names = write_agiqa(tmp_path, per_prompt=2)  # 40x40 images
    Image.new("RGB", (30, 20)).save(tmp_path / names[2])
    Image.new("RGB", (50, 28)).save(tmp_path / names[6])
    with pytest.raises(ValueError, match=r"2 of 8 images .*smaller than the 32 px crop this run takes: "
                       + names[2].replace(".", r"\.") + r" \(30x20\), " + names[6].replace(".", r"\.")
                       + r" \(50x28\)\. Lower --crop/--eval-crop to 20 or less, or pass --resize 32"):
        agiqa.load_agiqa(tmp_path, crop=32)
    with pytest.raises(ValueError, match=r"8 of 8 images .*smaller after --resize 24 than the 32 px crop.*"
                       + names[2].replace(".", r"\.") + r" \(36x24\)"):
        agiqa.load_agiqa(tmp_path, crop=32, resize=24)  # the sizes shown are after resizing: 30x20 -> 36x24
    assert len(agiqa.load_agiqa(tmp_path, crop=32, resize=32)[0]) == 8  # every shorter side becomes 32
    assert len(agiqa.load_agiqa(tmp_path, crop=20)[0]) == 8


def test_splits_group_by_prompt_and_are_seeded(tmp_path):
    groups = [f"prompt{i // 10}" for i in range(300)]
    drawn = splits.make_splits(groups, 5, (0.6, 0.2, 0.2), seed=3)
    assert drawn == splits.make_splits(groups, 5, (0.6, 0.2, 0.2), seed=3)
    assert drawn != splits.make_splits(groups, 5, (0.6, 0.2, 0.2), seed=4)
    for split in drawn:
        parts = [{groups[i] for i in split[p]} for p in splits.PARTS]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert sorted(i for p in splits.PARTS for i in split[p]) == list(range(300))
        assert [len(p) for p in parts] == [18, 6, 6]
    names = [f"img{i}.jpg" for i in range(300)]
    splits.save_splits(tmp_path / "s.json", drawn, names, seed=3)
    assert splits.load_splits(tmp_path / "s.json", groups) == drawn
    with pytest.raises(ValueError, match="outside 0..99"):
        splits.load_splits(tmp_path / "s.json", groups[:100])
    with pytest.raises(ValueError, match="prompts in two parts"):
        splits.load_splits(tmp_path / "s.json", [f"p{i % 7}" for i in range(300)])


def test_published_train_val_layout_becomes_train_val_test(tmp_path):
    groups = [f"prompt{i // 10}" for i in range(200)]
    train = [i for i in range(200) if (i // 10) % 5]  # 16 prompts
    val = [i for i in range(200) if (i // 10) % 5 == 0]  # 4 prompts
    (tmp_path / "pub.json").write_text(json.dumps({"source": "x", "splits": {"2": {"train": train, "val": val},
                                                                               "1": {"train": train, "val": val}}}))
    loaded = splits.load_splits(tmp_path / "pub.json", groups, (0.6, 0.2, 0.2), seed=1)
    assert len(loaded) == 2
    for split in loaded:
        assert split["test"] == val
        assert sorted(split["train"] + split["val"]) == train
        assert len({groups[i] for i in split["val"]}) == 4  # 0.2 / (0.6 + 0.2) of 16 prompts
    with pytest.raises(ValueError, match="neither a splits.json"):
        (tmp_path / "bad.json").write_text(json.dumps({"splits": {"1": {"train": [0]}}}))
        splits.load_splits(tmp_path / "bad.json", groups)


@pytest.mark.skipif(not (REAL_CSV.parent / "AGIQA-3K_splits_from_pkl.json").is_file() or not REAL_CSV.is_file(),
                    reason="the published AGIQA-3K splits are not present")
def test_real_published_splits_load_and_group_by_prompt():
    groups = [r.group for r in agiqa.read_csv(REAL_CSV)]
    loaded = splits.load_splits(REAL_CSV.parent / "AGIQA-3K_splits_from_pkl.json", groups)
    assert len(loaded) == 10
    assert all(len(s["train"]) + len(s["val"]) + len(s["test"]) == 2982 for s in loaded)


def test_split_argument_errors():
    assert splits.parse_ratios("3,1,1") == pytest.approx((0.6, 0.2, 0.2))
    with pytest.raises(ValueError, match="three positive numbers"):
        splits.parse_ratios("0.8,0.2")
    with pytest.raises(ValueError, match="at least 3 distinct prompts"):
        splits.make_splits(["a", "a", "b"], 1, (0.6, 0.2, 0.2), 0)


def test_synthetic_domains_are_deterministic_and_follow_the_score_formula():
    first = synthetic.make_domain("target", scenes=6, versions=4, size=32, seed=7)
    again = synthetic.make_domain("target", scenes=6, versions=4, size=32, seed=7)
    other = synthetic.make_domain("target", scenes=6, versions=4, size=32, seed=8)
    assert torch.equal(first.images, again.images) and torch.equal(first.mos, again.mos)
    assert not torch.equal(first.images, other.images)
    assert first.images.shape == (24, 3, 32, 32) and first.images.dtype == torch.uint8
    assert first.groups[:5] == ["target-0000"] * 4 + ["target-0001"]
    badness = sum(w * first.severities[k] for k, w in synthetic.WEIGHTS["target"].items())
    noiseless = 5 * torch.exp(-badness)
    residual = (first.mos - noiseless)[(first.mos > 0) & (first.mos < 5)]  # unclipped scores
    assert residual.abs().max() < 5 * synthetic.RATING_NOISE
    assert 0.3 * synthetic.RATING_NOISE < residual.std() < 2 * synthetic.RATING_NOISE
    source = synthetic.make_domain("source", scenes=2, versions=2, size=32, seed=7)
    assert set(source.severities) == set(synthetic.WEIGHTS["source"])


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible by 4"):
        synthetic.make_domain("source", 2, 2, size=30)
    with pytest.raises(ValueError, match="'source' or 'target'"):
        synthetic.make_domain("other", 2, 2)


def test_distortions_change_images_monotonically():
    clean = synthetic.make_domain("target", scenes=4, versions=1, size=32, seed=1).images.float() / 255
    strengths = [torch.full((4, 1, 1, 1), s) for s in (0.0, 0.5, 1.0)]
    g = torch.Generator().manual_seed(0)
    for name in ("blur", "contrast", "posterize", "color", "noise", "blocking", "ringing"):
        changes = [float((synthetic.DISTORTIONS[name](clean, s, g) - clean).abs().mean()) for s in strengths]
        assert changes[0] < 1e-6 and changes[0] < changes[1] < changes[2], name


def _pil_reference(path: Path, resize: int) -> torch.Tensor:
    """Pillow decoding written out: convert to RGB, bicubic resize of the shorter side, HWC -> CHW."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if resize:
            scale = resize / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _unequal_images(root: Path) -> list[str]:
    from PIL import Image

    names = write_agiqa(root, per_prompt=2)
    rng = np.random.default_rng(1)
    for k, name in enumerate(names):  # unequal sizes, and one greyscale file (converted to RGB)
        pixels = rng.integers(0, 256, size=(40 + 4 * k, 44 + 2 * k, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        (image.convert("L") if k == 3 else image).save(root / name, quality=85)
    return names


@pytest.mark.parametrize("resize", [0, 36])
def test_cache_holds_the_pixels_decoding_on_access_gives(tmp_path, resize):
    names = _unequal_images(tmp_path)
    records, cache = agiqa.load_agiqa(tmp_path, resize=resize, cache_bytes=1 << 30)
    assert len(records) == len(cache) == 8 and cache.held == 8
    assert cache.nbytes == sum(int(image.numel()) for image in cache.images)
    for j, name in enumerate(names):
        reference = _pil_reference(tmp_path / name, resize)
        assert cache.images[j] is not None and torch.equal(cache.get(j), reference), name
        assert cache.get(j).dtype == torch.uint8


def test_cache_stays_within_its_budget_and_decodes_the_rest_on_access(tmp_path):
    from examples.cnniqa_agiqa.images import image_bytes

    names = _unequal_images(tmp_path)
    budget = image_bytes(44, 40) * 3  # about three of the eight images
    _, cache = agiqa.load_agiqa(tmp_path, cache_bytes=budget)
    assert 1 <= cache.held < 8 and cache.nbytes <= budget
    assert "decoded again on every access" in cache.describe()
    for j, name in enumerate(names):
        assert torch.equal(cache.get(j), _pil_reference(tmp_path / name, 0)), name
    _, none = agiqa.load_agiqa(tmp_path, cache_bytes=0)  # --cache-mb 0: every access decodes
    assert none.held == 0 and none.nbytes == 0
    assert torch.equal(none.get(5), _pil_reference(tmp_path / names[5], 0))


def test_hflip_mirrors_half_of_the_training_crops_and_never_evaluation():
    from examples.cnniqa_agiqa.datasets import TensorImages

    images = torch.randint(0, 256, (1, 3, 12, 16), dtype=torch.uint8)
    plain = TensorImages(images, torch.zeros(1), [0], 8, True)
    flipping = TensorImages(images, torch.zeros(1), [0], 8, True, hflip=True)
    flipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        crop = plain[0][0]
        torch.manual_seed(seed)  # the same crop offsets are drawn first
        out = flipping[0][0]
        assert torch.equal(out, crop) or torch.equal(out, crop.flip(-1))
        flipped += not torch.equal(out, crop)
    assert 10 <= flipped <= 30
    evaluation = TensorImages(images, torch.zeros(1), [0], 8, False, hflip=True)
    assert all(torch.equal(evaluation[0][0], evaluation[0][0]) for _ in range(5))
    assert torch.equal(evaluation[0][0], images[0, :, 2:10, 4:12].float() / 255)
