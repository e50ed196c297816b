"""How well a particle set's poses cover the sphere of views: the sampling compensation factor.

View directions
---------------
A RELION pose ``A`` (:mod:`.so3`) sees the map's Fourier transform on the central section
``A^T (kx, ky, 0)`` (:func:`.projector.slice_coordinates` takes rows 0 and 1 of ``A``). The
section is perpendicular to ``A^T e_z = A[2, :]``, the projection (beam) direction in the map
frame, (x, y, z) with the map indexed ``[z, y, x]``. The in-plane angle psi (``A = Rz(psi) ...``)
leaves that row unchanged. ``n`` and ``-n`` give the same central section (mirror images), so the
Fourier coverage and every count here treat them as one axis.

Sampling compensation factor (Baldwin & Lyumkis 2020)
-----------------------------------------------------
P. R. Baldwin and D. Lyumkis, "Non-uniformity of projection distributions attenuates resolution
in Cryo-EM", Prog. Biophys. Mol. Biol. 150:160-183 (2020); computed as in the authors' tools
(github.com/LyumkisLab/CommandLineSCF, SamplingGui; Baldwin & Lyumkis 2021, Prog. Biophys. Mol.
Biol. 160:53-65):

* the Fourier directions k are a Fibonacci spiral of ``min(2 pi R^2, 5000)`` points on a hemisphere
  (k and -k are sampled alike), R the Fourier radius of the shell (default 50 voxels);
* the sampling S(k) is the number of views whose central section, one voxel thick, passes through
  the point R k: ``|k . n| * R < 1/2``;
* ``SCF = 1 / (<1/S>_{S>0} <S>)``, the harmonic mean of the sampling over the sampled directions
  divided by its mean over all of them: 1 for uniform views, lower for non-uniform ones (the factor
  by which non-uniformity lowers the spectral SNR of the reconstruction);
* ``SCF* = SCF / (1 + (Q/P) <S> SCF / 2)`` with Q the fraction of directions never sampled and
  P = 1 - Q, the version that also penalises empty regions of Fourier space (missing cones). It is
  the one to read: the SCF alone ignores the empty directions and can even exceed 1 then.

The authors' command-line tool draws at most 10,000 projection directions; so does
:func:`sampling_compensation_factor` (a fixed random subset: results are reproducible and the
zero penalty, which grows with <S> = n/(2R), is comparable between data sets of any size).

Threshold: views on one great circle only (side views about one axis, sampling proportional to
``1/sin(angle to that axis)``) give ``SCF = 8 / pi^2 = 0.81``; the authors and cryoSPARC's
Orientation Diagnostics take SCF* >= 0.81 as adequate sampling and below it as anisotropic
(preferred orientation). :data:`SCF_THRESHOLD` is that value. With fewer than
:data:`MIN_VIEWS` directions the count noise alone (``SCF ~ 1 - 2R/n`` for uniform views) pulls
the SCF down, so no warning is given then.
"""

from __future__ import annotations

import numpy as np

from .symmetry import point_group

SCF_THRESHOLD = 0.81  # 8 / pi^2: every view on one great circle (Baldwin & Lyumkis; cryoSPARC)
MIN_VIEWS = 1000  # fewer (symmetry-expanded) views: counting noise alone lowers the SCF
FOURIER_RADIUS = 50  # the authors' default shell, voxels
MAX_VIEWS = 10_000  # the authors' command-line tool uses at most this many projection directions
PREFERRED_CONE_DEG = 15.0
# more views than this within PREFERRED_CONE_DEG of one axis is a preferred orientation even where the SCF*
# is still above its threshold (1 - cos 15 deg = 3.4% for uniform views; the pose errors of a found set blur
# a 35% cluster to SCF* 0.81 and 28% within the cone)
PREFERRED_FRACTION_LIMIT = 0.2


def view_directions(rotations) -> np.ndarray:
    """Projection directions of RELION poses in the map frame, (P, 3) unit vectors (x, y, z).

    rotations: (P, 3, 3) pose matrices ``A`` (:mod:`.so3`): the image is the projection of the
    map rotated by ``A``, i.e. the central section ``A^T (kx, ky, 0)`` of its Fourier transform
    (:func:`.projector.slice_coordinates`). That section is perpendicular to ``A^T e_z``, the
    third row of ``A``, which is the direction along which the map is projected. It does not
    depend on the in-plane angle psi. A map point on the +z axis is seen when A = identity.
    """
    a = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    n = a[:, 2, :].copy()
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def expand_directions(directions, symmetry: str = "C1") -> np.ndarray:
    """View directions (P, 3) and all their copies under the point group, (|G| * P, 3), group-major.

    For a map with the symmetry G the poses A and A L (L in G) give the same image, and the view
    direction of A L is ``(A L)^T e_z = L^T n``: the copies are ``n @ L`` for every L
    (:func:`.symmetry.point_group`, identity first, so the first P rows are the input).
    """
    n = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    group = point_group(symmetry)
    return np.einsum("pi,gij->gpj", n, group).reshape(-1, 3)


def fibonacci_hemisphere(count: int) -> np.ndarray:
    """``count`` quasi-uniform unit vectors (x, y, z) with z > 0 (equal-area Fibonacci spiral), (count, 3)."""
    j = np.arange(count, dtype=np.float64)
    z = (j + 0.5) / count
    golden = np.pi * (np.sqrt(5.0) - 1.0)  # 2 pi / phi^2 mod 2 pi: the golden angle
    phi = golden * j
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _fourier_directions(fourier_radius: float) -> np.ndarray:
    return fibonacci_hemisphere(int(min(2 * np.pi * fourier_radius**2, 5000)))


def _used_directions(rotations, symmetry: str, max_views: int, seed: int) -> tuple[np.ndarray, int]:
    """The (expanded) view directions the statistics are computed on, and how many there were in all."""
    n = view_directions(rotations)
    group = point_group(symmetry)
    total = len(n) * len(group)
    if total > max_views:
        pick = np.random.default_rng(seed).choice(total, size=max_views, replace=False)
        element, particle = np.divmod(pick, len(n))
        return np.einsum("pi,pij->pj", n[particle], group[element]), total
    return expand_directions(n, symmetry), total


def _counts(kdirs: np.ndarray, views: np.ndarray, band: float, cone_cos: float, chunk: int = 2048):
    """Per Fourier direction k: the views n with ``|k.n| < band`` (central sections through k) and
    with ``|k.n| >= cone_cos`` (views within the double cone about k)."""
    k = kdirs.astype(np.float32)
    sampling = np.zeros(len(k), dtype=np.int64)
    cone = np.zeros(len(k), dtype=np.int64)
    for start in range(0, len(views), chunk):
        d = np.abs(k @ views[start : start + chunk].astype(np.float32).T)
        sampling += np.count_nonzero(d < band, axis=1)
        cone += np.count_nonzero(d >= cone_cos, axis=1)
    return sampling, cone


def least_sampled_axis(kdirs, sampling) -> np.ndarray:
    """The Fourier axis with the least sampling, (3,): the eigenvector of the smallest eigenvalue of
    ``sum_k S(k) k k^T`` over quasi-uniform directions (the short axis of the sampling's ellipsoid),
    sign chosen with z >= 0. Resolution is lowest along it: the map looks stretched along it.
    """
    k = np.asarray(kdirs, dtype=np.float64)
    tensor = np.einsum("k,ki,kj->ij", np.asarray(sampling, dtype=np.float64), k, k)
    axis = np.linalg.eigh(tensor)[1][:, 0]
    return -axis if axis[2] < 0 else axis


def scf_from_sampling(sampling) -> tuple[float, float]:
    """(SCF, SCF*) of the sampling S(k) over quasi-uniform Fourier directions (Baldwin & Lyumkis 2020).

    ``SCF = 1 / (<1/S>_{S>0} <S>)``, ``SCF* = SCF / (1 + (Q/P) <S> SCF / 2)``, Q the fraction of
    directions with S = 0 and P = 1 - Q. Nothing sampled gives (0, 0).
    """
    s = np.asarray(sampling, dtype=np.float64)
    sampled = s > 0
    if not sampled.any():
        return 0.0, 0.0
    mean = s.mean()
    scf = 1.0 / (np.mean(1.0 / s[sampled]) * mean)
    q = 1.0 - sampled.mean()
    scf_star = scf / (1.0 + q / (1.0 - q) * mean * scf / 2.0)
    return float(scf), float(scf_star)


def sampling_compensation_factor(
    rotations,
    symmetry: str = "C1",
    fourier_radius: float = FOURIER_RADIUS,
    max_views: int = MAX_VIEWS,
    seed: int = 0,
) -> tuple[float, float]:
    """(SCF, SCF*) of RELION poses (P, 3, 3), views expanded by the point group ``symmetry``.

    See the module docstring for the definition; at most ``max_views`` expanded views (a fixed
    random subset drawn with ``seed``) are counted.
    """
    views, _ = _used_directions(rotations, symmetry, max_views, seed)
    kdirs = _fourier_directions(fourier_radius)
    sampling, _ = _counts(kdirs, views, 0.5 / fourier_radius, 2.0)
    return scf_from_sampling(sampling)


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:+.2f}" for x in v) + ")"


def orientation_report(
    rotations,
    symmetry: str = "C1",
    fourier_radius: float = FOURIER_RADIUS,
    max_views: int = MAX_VIEWS,
    seed: int = 0,
) -> dict:
    """Orientation diagnostics of a particle set's poses (P, 3, 3), JSON-safe.

    Keys: ``n_views`` (particles), ``n_views_used`` (symmetry-expanded directions counted, at most
    ``max_views``), ``symmetry``, ``scf``, ``scf_star`` (Baldwin & Lyumkis 2020, module docstring),
    ``scf_threshold`` (0.81), ``fraction_unsampled`` (Fourier directions of the shell no view
    reaches), ``preferred_direction`` (x, y, z: the axis, +-, with most views within 15 deg),
    ``preferred_fraction`` (the fraction of views within 15 deg of it, either sense; 1 - cos 15 deg
    = 0.034 for uniform views), ``least_sampled_direction`` (the Fourier axis with the fewest
    central sections through it, :func:`least_sampled_axis`: the direction of lowest resolution,
    along which the map looks stretched),
    and ``warning``: None, or one line for the user when SCF* < 0.81 or more than 20% of the views lie
    within 15 deg of one axis (not given with fewer than
    1000 expanded views, where the count noise alone lowers the SCF: ``note`` says so).
    Directions are in the map frame, (x, y, z) with the map indexed [z, y, x].
    """
    n_views = int(np.asarray(rotations).reshape(-1, 3, 3).shape[0])
    report: dict = {
        "n_views": n_views,
        "n_views_used": 0,
        "symmetry": str(symmetry),
        "scf": None,
        "scf_star": None,
        "scf_threshold": SCF_THRESHOLD,
        "fourier_radius": float(fourier_radius),
        "fraction_unsampled": None,
        "preferred_direction": None,
        "preferred_fraction": None,
        "preferred_cone_deg": PREFERRED_CONE_DEG,
        "least_sampled_direction": None,
        "warning": None,
        "note": None,
    }
    if n_views == 0:
        report["note"] = "no particles"
        return report
    views, total = _used_directions(rotations, symmetry, max_views, seed)
    kdirs = _fourier_directions(fourier_radius)
    cone_cos = float(np.cos(np.deg2rad(PREFERRED_CONE_DEG)))
    sampling, cone = _counts(kdirs, views, 0.5 / fourier_radius, cone_cos)
    scf, scf_star = scf_from_sampling(sampling)
    top = int(np.argmax(cone))
    preferred = kdirs[top]
    least = least_sampled_axis(kdirs, sampling)
    fraction = float(cone[top] / len(views))
    report.update(
        n_views_used=int(len(views)),
        scf=round(scf, 4),
        scf_star=round(scf_star, 4),
        fraction_unsampled=round(float(np.mean(sampling == 0)), 4),
        preferred_direction=[round(float(x), 4) for x in preferred],
        preferred_fraction=round(fraction, 4),
        least_sampled_direction=[round(float(x), 4) for x in least],
    )
    if total < MIN_VIEWS:
        report["note"] = f"only {total} views: too few to judge the coverage (the SCF needs about {MIN_VIEWS})"
    elif scf_star < SCF_THRESHOLD or fraction > PREFERRED_FRACTION_LIMIT:
        coverage = (
            f"the views do not cover the sphere well (SCF* {scf_star:.3f} < {SCF_THRESHOLD})"
            if scf_star < SCF_THRESHOLD
            else f"the views still reach every direction (SCF* {scf_star:.3f})"
        )
        report["warning"] = (
            f"preferred orientation: {100 * fraction:.0f}% of the views lie within {PREFERRED_CONE_DEG:.0f} deg "
            f"of the axis (x, y, z) = {_fmt(preferred)} ({100 * (1 - cone_cos):.0f}% for uniform views); "
            f"{coverage}; resolution is lowest along {_fmt(least)} and the map may look stretched along it"
        )
    return report
