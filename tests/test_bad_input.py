"""Bad particle input: one clear error naming the file, row or column."""

import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from habinit_plugin.engine.halves import assign_half_sets
from habinit_plugin.engine.particles import ParticleError, load_particles
from habinit_plugin.engine.star import StarBlock, write_star

OPTICS = [
    "rlnOpticsGroup",
    "rlnOpticsGroupName",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
]


def make_stack(path, n=4, shape=(16, 16), nan_at=None):
    data = np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)
    if nan_at is not None:
        data[nan_at, 3, 3] = np.nan
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
    return path


def make_star(folder, stack="stack.mrcs", n=4, drop=(), optics_rows=None, group_of=None, names=None, columns=None):
    optics = StarBlock("optics", list(OPTICS), optics_rows or [["1", "g1", "300", "2.7", "0.1", "1.5", "16", "2"]])
    table = StarBlock("particles", [], [[] for _ in range(n)])
    table.set_column("rlnImageName", names or [f"{i + 1:06d}@{stack}" for i in range(n)])
    table.set_column("rlnOpticsGroup", group_of if group_of is not None else [1] * n)
    table.set_column("rlnDefocusU", [15000.0] * n)
    table.set_column("rlnDefocusV", [14000.0] * n)
    table.set_column("rlnDefocusAngle", [10.0] * n)
    table.set_column("rlnImageId", list(range(101, 101 + n)))
    for name, values in (columns or {}).items():
        table.set_column(name, values)
    optics.drop_columns(drop)
    table.drop_columns(drop)
    path = folder / "particles.star"
    write_star(path, [optics, table])
    return path


@pytest.fixture
def good(tmp_path):
    make_stack(tmp_path / "stack.mrcs")
    return tmp_path


def test_good_input_loads(good):
    particles = load_particles(make_star(good))
    assert len(particles) == 4 and particles.box == 16
    assert particles.read_images([0, 3]).shape == (2, 16, 16)


def test_missing_stack(good):
    path = make_star(good, stack="nowhere/missing.mrcs")
    with pytest.raises(ParticleError, match=r"row 1: image stack 'nowhere/missing.mrcs' not found"):
        load_particles(path)


def test_index_past_end_of_stack(good):
    names = ["000001@stack.mrcs", "000002@stack.mrcs", "000009@stack.mrcs", "000003@stack.mrcs"]
    with pytest.raises(ParticleError, match=r"row 3: image 9@stack.mrcs is past the end .* holds 4 image"):
        load_particles(make_star(good, names=names))


def test_missing_defocus_column(good):
    with pytest.raises(ParticleError, match=r"missing CTF column _rlnDefocusU"):
        load_particles(make_star(good, drop=["rlnDefocusU"]))


def test_missing_voltage_column(good):
    with pytest.raises(ParticleError, match=r"missing CTF column _rlnVoltage .*data_optics"):
        load_particles(make_star(good, drop=["rlnVoltage"]))


def test_mixed_pixel_sizes(good):
    rows = [["1", "g1", "300", "2.7", "0.1", "1.5", "16", "2"], ["2", "g2", "300", "2.7", "0.1", "1.2", "16", "2"]]
    with pytest.raises(ParticleError, match=r"mixed pixel sizes \(1.2, 1.5 A\)"):
        load_particles(make_star(good, optics_rows=rows, group_of=[1, 2, 1, 2]))


def test_unknown_optics_group(good):
    with pytest.raises(ParticleError, match=r"optics group\(s\) \[7\] absent"):
        load_particles(make_star(good, group_of=[1, 7, 1, 1]))


def test_non_square_images(tmp_path):
    make_stack(tmp_path / "stack.mrcs", shape=(16, 20))
    with pytest.raises(ParticleError, match=r"stack.mrcs: images are not square \(16 x 20"):
        load_particles(make_star(tmp_path))


def test_odd_box(tmp_path):
    make_stack(tmp_path / "stack.mrcs", shape=(15, 15))
    with pytest.raises(ParticleError, match=r"box size is odd \(15 pixels\)"):
        load_particles(make_star(tmp_path))


def test_nan_pixels_name_the_particle(tmp_path):
    make_stack(tmp_path / "stack.mrcs", nan_at=2)
    particles = load_particles(make_star(tmp_path))
    particles.read_images([0, 1])  # clean ones are fine
    expected = r"particle 103 \(row 3 of .*particles.star, image 3@.*stack.mrcs\) contains NaN"
    with pytest.raises(ParticleError, match=expected):
        particles.read_images([0, 2])


def test_truncated_stack(good):
    stack = good / "stack.mrcs"
    data = stack.read_bytes()
    stack.write_bytes(data[: len(data) - 100])
    with pytest.raises(ParticleError, match=r"stack.mrcs: file is truncated"):
        load_particles(make_star(good))


def test_not_an_mrc_file(good):
    (good / "stack.mrcs").write_bytes(b"this is not an MRC file" * 10)
    with pytest.raises(ParticleError, match=r"stack.mrcs"):
        load_particles(make_star(good))


def test_non_numeric_value_names_row_and_column(good):
    path = make_star(good)
    text = path.read_text().replace("15000.000000", "abc", 1)
    path.write_text(text)
    with pytest.raises(ParticleError, match=r"row 1: _rlnDefocusU = 'abc' is not a number"):
        load_particles(path)


def test_missing_star_file(tmp_path):
    with pytest.raises(ParticleError, match=r"no such particles file"):
        load_particles(tmp_path / "nothing.star")


def test_cli_reports_one_clear_error(good, tmp_path):
    path = make_star(good, drop=["rlnDefocusU"])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "habinit_plugin.engine",
            "reconstruct",
            "--particles",
            str(path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "error: " in result.stderr and "_rlnDefocusU" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"rlnDefocusU": [15000.0, float("nan"), 15000.0, 15000.0]}, r"row 2: _rlnDefocusU = nan is not a finite"),
        ({"rlnDefocusAngle": [10.0, 10.0, float("inf"), 10.0]}, r"row 3: _rlnDefocusAngle = inf is not a finite"),
        ({"rlnCtfBfactor": [0.0, 0.0, 0.0, float("-inf")]}, r"row 4: _rlnCtfBfactor = -inf"),
        (
            {
                "rlnAngleRot": [0.0, 1.0, 2.0, 3.0],
                "rlnAngleTilt": [0.0, float("nan"), 0.0, 0.0],
                "rlnAnglePsi": [0.0] * 4,
            },
            r"row 2: _rlnAngleTilt = nan",
        ),
        (
            {f"rlnAngle{a}": [0.0] * 4 for a in ("Rot", "Tilt", "Psi")}
            | {"rlnOriginXAngst": [0.0, 0.0, 0.0, float("nan")], "rlnOriginYAngst": [0.0] * 4},
            r"row 4: _rlnOriginXAngst = nan",
        ),
    ],
)
def test_non_finite_values_name_the_row_and_column(good, columns, message):
    """One NaN or inf in a column the engine uses stops it before any work, naming file, row and column."""
    path = make_star(good, columns=columns)
    with pytest.raises(ParticleError, match=message) as info:
        load_particles(path)
    assert str(path) in str(info.value)


def test_non_finite_optics_value_is_refused(good):
    rows = [["1", "g1", "nan", "2.7", "0.1", "1.5", "16", "2"]]
    with pytest.raises(ParticleError, match=r"row 1: _rlnVoltage = nan is not a finite number \(4 row"):
        load_particles(make_star(good, optics_rows=rows))


def test_duplicated_images_are_refused_with_their_rows(good):
    """The same image on two rows could be put in both half sets: the split refuses it, naming the input
    rows and the image, and says how to keep them."""
    names = ["000001@stack.mrcs", "000002@stack.mrcs", "000003@stack.mrcs", "000002@stack.mrcs"]
    particles = load_particles(make_star(good, names=names))
    with pytest.raises(ParticleError, match=r"rows 2, 4 hold the same image 2@.*stack.mrcs; 1 image\(s\) appear"):
        assign_half_sets(particles, seed=0)
    with pytest.raises(ParticleError, match=r"rows 2, 4 hold the same image"):  # input rows, not subset positions
        assign_half_sets(particles.subset([2, 3, 1]), seed=0)


def _merged_set(folder, n_images=58, n_copies=42, split=None):
    """100 rows: 58 images of which 42 stand on two rows, in shuffled order (a merge of two picking jobs)."""
    make_stack(folder / "stack.mrcs", n=n_images)
    rng = np.random.default_rng(4)
    index = rng.permutation(np.concatenate([np.arange(n_images), rng.choice(n_images, n_copies, replace=False)]))
    names = [f"{i + 1:06d}@stack.mrcs" for i in index]
    columns = {"rlnRandomSubset": split(index)} if split else {}
    return load_particles(make_star(folder, n=len(names), names=names, columns=columns)), index


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kept_duplicates_stay_in_one_half_set(tmp_path, seed):
    """With keep_duplicates, 42 of 58 images on two rows: every copy of an image in the same half set, the
    halves balanced to within one image's copies, and the same split for the same seed."""
    particles, image = _merged_set(tmp_path)
    half, how = assign_half_sets(particles, seed=seed, keep_duplicates=True)
    assert "random split of the images" in how
    for i in np.unique(image):
        assert len(np.unique(half[image == i])) == 1
    assert abs(int(np.sum(half == 1)) - int(np.sum(half == 2))) <= 2
    assert np.array_equal(half, assign_half_sets(particles, seed=seed, keep_duplicates=True)[0])


def test_an_input_split_that_separates_copies_is_refused(tmp_path):
    particles, image = _merged_set(tmp_path, split=lambda index: 1 + np.arange(len(index)) % 2)
    with pytest.raises(ParticleError, match=r"rows \d+, \d+ hold the same image but the input split puts them in"):
        assign_half_sets(particles, seed=0, keep_duplicates=True)
    folder = tmp_path / "consistent"
    folder.mkdir()
    particles, image = _merged_set(folder, split=lambda index: 1 + index % 2)
    half, how = assign_half_sets(particles, seed=0, keep_duplicates=True)
    assert how.startswith("input split") and np.array_equal(half, 1 + image % 2)


def test_cli_refuses_a_nan_defocus_before_any_work(good, tmp_path):
    path = make_star(good, columns={"rlnDefocusU": [15000.0, 15000.0, float("nan"), 15000.0]})
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "habinit_plugin.engine", "run", "--particles", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "row 3: _rlnDefocusU = nan" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_tools_refuse_maps_with_nan_voxels(tmp_path):
    """`habinit fsc` and `habinit align` on a map holding NaN: one line naming the file, no result."""
    good = np.random.default_rng(1).normal(size=(16, 16, 16)).astype(np.float32)
    bad = good.copy()
    bad[3, 4, 5] = np.nan
    for name, volume in (("good.mrc", good), ("bad.mrc", bad)):
        with mrcfile.new(tmp_path / name, overwrite=True) as mrc:
            mrc.set_data(volume)
            mrc.voxel_size = 2.0
    for command in (["fsc"], ["align", "--out", str(tmp_path / "aligned.mrc")]):
        args = [sys.executable, "-m", "habinit_plugin.engine", command[0], str(tmp_path / "good.mrc")]
        result = subprocess.run([*args, str(tmp_path / "bad.mrc"), *command[1:]], capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert "bad.mrc: 1 voxel(s) are NaN or infinite" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "aligned.mrc").exists()


def test_no_result_is_written_from_a_nan_map(tmp_path):
    from habinit_plugin.engine.jobs import check_result
    from habinit_plugin.engine.outputs import ResultError

    volume = np.zeros((8, 8, 8), dtype=np.float32)
    check_result({"half map A": volume}, np.ones(5))
    volume[1, 2, 3] = np.inf
    with pytest.raises(ResultError, match="half map A has 1 NaN or infinite voxel"):
        check_result({"half map A": volume})
    with pytest.raises(ResultError, match="the FSC is NaN"):
        check_result({}, np.array([1.0, np.nan]))


def test_image_number_zero_says_numbers_start_at_1(good):
    names = ["000001@stack.mrcs", "000000@stack.mrcs", "000003@stack.mrcs", "000004@stack.mrcs"]
    with pytest.raises(ParticleError, match=r"row 2: _rlnImageName '000000@stack.mrcs': image numbers start at 1"):
        load_particles(make_star(good, names=names))


def test_random_bytes_are_not_called_pickled_data(tmp_path):
    path = tmp_path / "particles.cs"
    path.write_bytes(np.random.default_rng(3).bytes(4000))
    with pytest.raises(ParticleError, match=r"not a cryoSPARC .cs file") as info:
        load_particles(path)
    assert "pickle" not in str(info.value)


def test_a_data_images_block_takes_the_pixel_size_from_data_optics(good):
    """A particles block under another name (data_images) still uses the file's data_optics."""
    path = make_star(good)
    path.write_text(path.read_text().replace("data_particles", "data_images"))
    particles = load_particles(path)
    assert len(particles) == 4 and particles.pixel_size == 1.5


@pytest.mark.parametrize("keep, values", [(4, 4), (8, 8)])
def test_a_ragged_row_is_named_with_its_count(good, capsys, keep, values):
    """A row with too few or too many values: the row, line and counts, nothing of emtable's internals."""
    path = make_star(good)
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("000002@"))
    words = lines[at].split()
    lines[at] = " ".join(words[:keep] if keep < len(words) else words + ["7"] * (keep - len(words)))
    path.write_text("\n".join(lines) + "\n")
    message = rf"{path}: data_particles row 2 \(line {at + 1}\) has {values} values for 6 columns$"
    with pytest.raises(ParticleError, match=message):
        load_particles(path)
    assert capsys.readouterr().out == ""
