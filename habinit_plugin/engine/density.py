"""Density maps from atomic models, and the bundled test proteins.

Two structures are bundled (gzipped PDB files in ``data/``), named for
:func:`bundled_structure_path` and ``habinit simulate --protein``:

* ``adk`` (the default everywhere): adenylate kinase from E. coli in its open state
  (PDB 4AKE, 214 residues, about 24 kDa, hydrogens included), as distributed in the
  MDAnalysisTests package (``adk_open.pdb``).
* ``pr``: the ligand-binding domain of the human progesterone receptor bound to
  progesterone (PDB 1A28, chain A only: residues 682-932 and its ligand STR, about
  29 kDa, no hydrogens), ``progesterone_receptor_1a28_A.pdb.gz``, cut from the
  MDAnalysisTests package's ``1a28.pdb.gz``. A second object of similar mass and
  another shape, e.g. to check that a result is not tuned to adk.

Maps are sums of per-atom electron scattering Gaussians (gemmi's ``DensityCalculatorE``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

BUNDLED_STRUCTURES = {"adk": "adk_open.pdb.gz", "pr": "progesterone_receptor_1a28_A.pdb.gz"}
DEFAULT_PROTEIN = "adk"
BUNDLED_PDB = BUNDLED_STRUCTURES[DEFAULT_PROTEIN]
DEFAULT_BOX = 64
DEFAULT_PIXEL_SIZE = 1.8  # Angstrom; the box is then 115 A for a protein about 75 A long


def bundled_structure_path(name: str = DEFAULT_PROTEIN) -> Path:
    """Path of the bundled atomic model ``name`` ('adk' or 'pr', see the module doc; gzipped PDB)."""
    if name not in BUNDLED_STRUCTURES:
        raise ValueError(f"no bundled protein {name!r}: choose one of {', '.join(BUNDLED_STRUCTURES)}")
    return Path(str(resources.files("habinit_plugin.engine") / "data" / BUNDLED_STRUCTURES[name]))


def atoms_to_map(model_path: str | Path, box: int, pixel_size: float, blur: float = 30.0) -> np.ndarray:
    """Electron-scattering density of an atomic model, centred in a cubic box.

    model_path: PDB/mmCIF (optionally gzipped); box: pixels per side; pixel_size:
    Angstrom; blur: B-factor (Angstrom^2) added to every atom. The model's centre
    of mass is put on the box centre (voxel box // 2). Returns (box, box, box)
    float32 indexed [z, y, x].
    """
    import gemmi  # noqa: PLC0415

    structure = gemmi.read_structure(str(model_path))
    model = structure[0]
    positions = np.array([atom.pos.tolist() for chain in model for res in chain for atom in res])
    if len(positions) == 0:
        raise ValueError(f"{model_path}: the model holds no atoms")
    offset = gemmi.Position(*((box // 2) * pixel_size - positions.mean(axis=0)))
    for chain in model:
        for residue in chain:
            for atom in residue:
                atom.pos = atom.pos + offset
    return _model_density(model, box, pixel_size, blur)


def _model_density(model, box: int, pixel_size: float, blur: float = 30.0) -> np.ndarray:
    """gemmi's electron-scattering density of a model whose atoms lie in the box (0..box * pixel_size A)."""
    import gemmi  # noqa: PLC0415

    calc = gemmi.DensityCalculatorE()
    calc.d_min = 2.0 * pixel_size
    calc.blur = blur
    calc.grid.set_unit_cell(gemmi.UnitCell(box * pixel_size, box * pixel_size, box * pixel_size, 90, 90, 90))
    calc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    calc.grid.set_size(box, box, box)
    calc.grid.fill(0.0)
    calc.add_model_density_to_grid(model)
    calc.grid.symmetrize_sum()
    return np.ascontiguousarray(np.array(calc.grid, copy=True).transpose(2, 1, 0), dtype=np.float32)


def bundled_protein_map(
    box: int = DEFAULT_BOX, pixel_size: float = DEFAULT_PIXEL_SIZE, name: str = DEFAULT_PROTEIN
) -> np.ndarray:
    """Density map of a bundled protein (default adenylate kinase, 4AKE), (box, box, box) float32."""
    return atoms_to_map(bundled_structure_path(name), box, pixel_size)


# the copies of the asymmetric unit sit off every symmetry axis, in this direction from the centre
_UNIT_DIRECTION = np.array([0.62, 0.33, 0.71]) / np.linalg.norm([0.62, 0.33, 0.71])


def symmetric_protein_map(
    group: np.ndarray, box: int = DEFAULT_BOX, pixel_size: float = DEFAULT_PIXEL_SIZE, model_path=None
):
    """A particle with the point-group symmetry ``group`` ((|G|, 3, 3) rotations about the box centre) built
    from the bundled protein (or the atomic model ``model_path``): one copy of an asymmetric unit per operator.

    The unit is the part of the protein within a radius of its centre, placed off the axes so that the
    copies fill a sphere of 0.38 box without much overlap (a smaller core for more copies); the centre of
    mass is at the box centre, as a picker centres particles. Returns ((box, box, box) float32 map, the unit's
    radius in Angstrom).
    """
    import gemmi  # noqa: PLC0415

    order = len(group)
    direction = _UNIT_DIRECTION.copy()
    if np.allclose(group[:, 2, 2], 1.0):  # Cn: copies around the axis, so that the centre of mass is the box centre
        direction[2] = 0.0
        direction /= np.linalg.norm(direction)
    outer = 0.38 * box * pixel_size
    distance = outer / (1.0 + np.sqrt(2.0 / order))  # |G| discs of the unit's radius on a sphere, half covered
    structure = gemmi.read_structure(str(bundled_structure_path() if model_path is None else model_path))
    residues = [res for chain in structure[0] for res in chain]
    positions = np.array([atom.pos.tolist() for res in residues for atom in res])
    centre = positions.mean(axis=0)
    radius = min(distance * np.sqrt(2.0 / order), float(np.linalg.norm(positions - centre, axis=1).max()))
    model = gemmi.Model(1)
    for k, rotation in enumerate(group):
        chain = gemmi.Chain(f"C{k}")
        for res in residues:
            copy = res.clone()
            for i in reversed(range(len(copy))):
                p = np.array(copy[i].pos.tolist()) - centre
                if np.linalg.norm(p) > radius:
                    del copy[i]
                else:
                    copy[i].pos = gemmi.Position(*(rotation @ (p + distance * direction) + box // 2 * pixel_size))
            if len(copy):
                chain.add_residue(copy)
        model.add_chain(chain)
    return _model_density(model, box, pixel_size), float(radius)
