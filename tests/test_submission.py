"""submission.csv: writing, reading back, and the checker (on the real test images)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cellmask.cli import main
from cellmask.data.rle import rle_decode, rle_encode
from cellmask.submission import (
    SubmissionReport,
    check_submission,
    inspect_submission,
    masks_to_submission_rows,
    read_submission,
    write_submission,
)

H, W = 520, 704
TEST_IDS = ("7ae19de7bc2a", "d48ec7815252", "d8bfd1dafdc4")  # the real test images, sorted


def _square(y: int, x: int, size: int = 20) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y : y + size, x : x + size] = True
    return m


@pytest.fixture
def test_images(real_root: Path) -> Path:
    return real_root / "test"


@pytest.fixture
def valid_predictions() -> dict[str, list[str]]:
    """A few disjoint instances on each real test image (the third has none)."""
    return {
        TEST_IDS[0]: [
            rle_encode(_square(10, 10)),
            rle_encode(_square(10, 40)),
            rle_encode(_square(300, 600)),
        ],
        TEST_IDS[1]: [rle_encode(_square(500, 684))],  # touches the last row and column
        TEST_IDS[2]: [],
    }


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --- writer -----------------------------------------------------------------------------------


def test_write_every_id_present_in_order_with_an_empty_row(tmp_path: Path, valid_predictions) -> None:
    order = [TEST_IDS[2], TEST_IDS[1], TEST_IDS[0]]
    path = write_submission(tmp_path / "sub" / "submission.csv", valid_predictions, order)
    lines = path.read_text().splitlines()
    assert lines[0] == "id,predicted"
    assert [ln.split(",")[0] for ln in lines[1:]] == [TEST_IDS[2], TEST_IDS[1], *[TEST_IDS[0]] * 3]
    assert lines[1] == f"{TEST_IDS[2]},"  # an image without instances: one empty row
    assert not (tmp_path / "sub" / "submission.csv.tmp").exists()

    # Ids missing from predictions entirely still get their empty row.
    path = write_submission(tmp_path / "s2.csv", {TEST_IDS[0]: ["1 5"]}, TEST_IDS)
    assert read_submission(path) == {TEST_IDS[0]: ["1 5"], TEST_IDS[1]: [], TEST_IDS[2]: []}


def test_write_then_read_round_trip(tmp_path: Path, valid_predictions) -> None:
    path = write_submission(tmp_path / "submission.csv", valid_predictions)
    back = read_submission(path)
    assert back == valid_predictions
    assert list(back) == list(valid_predictions)
    np.testing.assert_array_equal(rle_decode(back[TEST_IDS[1]][0], H, W), _square(500, 684))


def test_read_accepts_a_byte_order_mark_and_spaced_header(tmp_path: Path, valid_predictions) -> None:
    # the metric's fast CSV scanner scores such files; the general reader must read them the same
    path = write_submission(tmp_path / "submission.csv", valid_predictions)
    lines = path.read_text().splitlines()
    odd = tmp_path / "odd.csv"
    odd.write_text("\ufeff id , predicted \n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    assert read_submission(odd) == valid_predictions


def test_write_rejects_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "submission.csv"
    with pytest.raises(ValueError, match="not in image_ids: cafe"):
        write_submission(out, {"cafe": ["1 2"], "a": []}, ["a"])
    with pytest.raises(ValueError, match="repeats id"):
        write_submission(out, {}, ["a", "b", "a"])
    with pytest.raises(ValueError, match=r"predictions\['a'\] is a string"):
        write_submission(out, {"a": "1 2"})
    with pytest.raises(ValueError, match=r"predictions\['a'\]\[1\]: RLE has an odd number"):
        write_submission(out, {"a": ["1 2", "1 2 3"]})
    assert not out.exists()


def test_write_skips_empty_rles(tmp_path: Path) -> None:
    path = write_submission(tmp_path / "submission.csv", {"a": ["", "3 4", " "]})
    assert path.read_text() == "id,predicted\na,3 4\n"


def test_masks_to_submission_rows() -> None:
    masks = np.stack([_square(0, 0, 2), np.zeros((H, W), dtype=bool), _square(1, 5, 1)])
    assert masks_to_submission_rows("x", masks) == [("x", "1 2 705 2"), ("x", "710 1")]
    assert masks_to_submission_rows("x", np.zeros((0, H, W), dtype=bool)) == [("x", "")]
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        masks_to_submission_rows("x", _square(0, 0))


# --- checker: valid -----------------------------------------------------------------------------


def test_valid_submission_passes(tmp_path: Path, test_images: Path, valid_predictions, capsys) -> None:
    path = write_submission(tmp_path / "submission.csv", valid_predictions, TEST_IDS)
    report = inspect_submission(path, test_images)
    assert isinstance(report, SubmissionReport)
    assert report.ok and report.problems == []
    assert (report.n_rows, report.n_images) == (5, 3)
    assert check_submission(path, test_images) == []

    assert main(["check-submission", str(path), "--images", str(test_images)]) == 0
    assert capsys.readouterr().out.strip() == "OK: 5 rows, 3 images"


# --- checker: each broken variant --------------------------------------------------------------


def _problems(path: Path, images: Path) -> list[str]:
    problems = check_submission(path, images)
    assert problems, "expected at least one problem"
    return problems


def test_missing_id(tmp_path: Path, test_images: Path, valid_predictions) -> None:
    del valid_predictions[TEST_IDS[2]]
    path = write_submission(tmp_path / "submission.csv", valid_predictions)
    assert _problems(path, test_images) == [
        f"missing id {TEST_IDS[2]}: image {TEST_IDS[2]}.png has no row (an image without instances "
        "still needs one row with an empty predicted)"
    ]


def test_unknown_id_via_cli(tmp_path: Path, test_images: Path, valid_predictions, capsys) -> None:
    valid_predictions["0123456789ab"] = ["1 3"]
    path = write_submission(tmp_path / "submission.csv", valid_predictions)
    assert main(["check-submission", str(path), "--images", str(test_images)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"unknown id 0123456789ab: 1 row(s) from line 7, but no image 0123456789ab.* in {test_images}"
    ]


def test_malformed_rle_names_id_and_line(tmp_path: Path, test_images: Path, capsys) -> None:
    path = _write_lines(
        tmp_path / "submission.csv",
        [
            "id,predicted",
            f"{TEST_IDS[0]},1 5",
            f"{TEST_IDS[1]},10 2 30",
            f"{TEST_IDS[1]},7 x",
            f"{TEST_IDS[2]},",
        ],
    )
    assert main(["check-submission", str(path), "--images", str(test_images)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].startswith(f"id {TEST_IDS[1]}, line 3: malformed RLE: RLE has an odd number of tokens (3)")
    assert out[1].startswith(f"id {TEST_IDS[1]}, line 4: malformed RLE: RLE token 'x' is not an integer")


def test_out_of_bounds_run(tmp_path: Path, test_images: Path) -> None:
    n = H * W
    path = _write_lines(
        tmp_path / "submission.csv",
        ["id,predicted", f"{TEST_IDS[0]},{n - 9} 10", f"{TEST_IDS[1]},5 5 {n - 8} 10", f"{TEST_IDS[2]},"],
    )
    problems = _problems(path, test_images)
    assert problems == [
        f"id {TEST_IDS[1]}, line 3: out-of-bounds RLE: run {n - 8}+10 (pair 1) ends beyond the image "
        f"({H}x{W} = {n} pixels)"
    ]  # the run ending exactly at the last pixel (line 2) is fine


def test_overlapping_instances(tmp_path: Path, test_images: Path, valid_predictions, capsys) -> None:
    valid_predictions[TEST_IDS[0]].append(rle_encode(_square(25, 25, 5)))  # 5x5 inside line 2's square
    path = write_submission(tmp_path / "submission.csv", valid_predictions)
    assert main(["check-submission", str(path), "--images", str(test_images)]) == 1
    out = capsys.readouterr().out.strip()
    assert (
        out == f"id {TEST_IDS[0]}: 25 pixel(s) claimed by more than one instance (2 rows overlap: lines 2, 5)"
    )


def test_empty_masks(tmp_path: Path, test_images: Path) -> None:
    path = _write_lines(
        tmp_path / "submission.csv",
        ["id,predicted", f"{TEST_IDS[0]},1 5", f"{TEST_IDS[0]},", f"{TEST_IDS[1]},1 0", f"{TEST_IDS[2]},"],
    )
    problems = _problems(path, test_images)
    assert len(problems) == 2
    assert problems[0].startswith(f"id {TEST_IDS[0]}, line 3: empty predicted, but the image has other rows")
    assert problems[1] == f"id {TEST_IDS[1]}, line 4: empty mask (zero-area RLE '1 0')"


def test_corrupt_image_file(tmp_path: Path, test_images: Path, valid_predictions, capsys) -> None:
    images = tmp_path / "test"
    shutil.copytree(test_images, images)
    (images / "badbadbadbad.png").write_bytes(b"\x89PNG garbage, not an image" * 10)
    valid_predictions["badbadbadbad"] = []
    path = write_submission(tmp_path / "submission.csv", valid_predictions)
    assert main(["check-submission", str(path), "--images", str(images)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith(f"unreadable image {images / 'badbadbadbad.png'}: UnidentifiedImageError")


def test_header_problems(tmp_path: Path, test_images: Path) -> None:
    rows = [f"{TEST_IDS[0]},1 5", f"{TEST_IDS[1]},", f"{TEST_IDS[2]},"]
    missing = _write_lines(tmp_path / "a.csv", ["id,prediction", *rows])
    assert _problems(missing, test_images) == [
        "line 1: missing column(s) predicted (header: ['id', 'prediction'])"
    ]
    repeated = _write_lines(tmp_path / "b.csv", ["id,predicted", *rows[:1], "id,predicted", *rows[1:]])
    assert _problems(repeated, test_images) == ["line 3: repeated header row"]
    dup_col = _write_lines(
        tmp_path / "c.csv", ["id,predicted,id", *(r + "," + r.split(",")[0] for r in rows)]
    )
    assert _problems(dup_col, test_images) == [
        "line 1: duplicate column(s) id in header ['id', 'predicted', 'id']"
    ]
    fields = _write_lines(tmp_path / "d.csv", ["id,predicted", *rows, f"{TEST_IDS[0]},9 1,extra"])
    assert _problems(fields, test_images) == ["line 5: 3 field(s), the header has 2"]
    empty = tmp_path / "e.csv"
    empty.write_text("")
    assert _problems(empty, test_images)[0].endswith("empty file (expected the header id,predicted)")


def test_missing_files_exit_2(tmp_path: Path, test_images: Path, capsys) -> None:
    assert main(["check-submission", str(tmp_path / "nope.csv"), "--images", str(test_images)]) == 2
    assert "no such submission file" in capsys.readouterr().err
    path = write_submission(tmp_path / "submission.csv", {"a": []})
    assert main(["check-submission", str(path), "--images", str(tmp_path / "nowhere")]) == 2
    assert "no such images folder" in capsys.readouterr().err


def test_window_runs_equal_the_runs_of_the_full_mask() -> None:
    from cellmask.submission import window_to_rle

    rng = np.random.default_rng(0)
    for _ in range(2000):
        height, width = (int(v) for v in rng.integers(1, 12, 2))
        h, w = int(rng.integers(0, height + 1)), int(rng.integers(0, width + 1))
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        window = rng.random((h, w)) < rng.random()
        full = np.zeros((height, width), dtype=bool)
        full[y0 : y0 + h, x0 : x0 + w] = window
        assert window_to_rle(window, (y0, x0), width) == rle_encode(full), (height, width, h, w, y0, x0)
    # a window spanning the full width: runs continue from one row onto the next
    assert window_to_rle(np.ones((2, 4), bool), (1, 0), 4) == "5 8"
