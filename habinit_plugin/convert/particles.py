"""Scipion particle sets <-> the engine's RELION 3.1 STAR files, through scipion-em-relion.

Writing: scipion-em-relion's ``writeSetOfParticles`` (the STAR RELION users get from
Scipion), with ``rlnImageId`` = Scipion objId and image names pointing at the existing
stacks (no copy). Reading back: rows are matched by ``rlnImageId``, never by position,
and RELION angles/origins become Scipion transforms with scipion-em-relion's Reader.
"""

from __future__ import annotations

import os
import re

from pwem.constants import ALIGN_NONE, ALIGN_PROJ
from pwem.objects import Float, Integer, Transform
from pyworkflow.plugin import Domain

_NEEDS_QUOTES = re.compile(r"[\s'\"]")
_PLAIN_EXTENSION = re.compile(r"[.]\w+")
_SCIPION_SUFFIX = re.compile(r":(mrcs?|spi|stk|hdf|st)$")


def _relion_convert():
    return Domain.importFromPlugin("relion.convert", doRaise=True)


def stack_files(part_set) -> list[str]:
    """The distinct image files of a set (without Scipion's ':mrcs' style suffix)."""
    return sorted({_SCIPION_SUFFIX.sub("", fn) for fn in part_set.getFiles()})


def write_particles_star(part_set, star_file: str) -> None:
    """Write ``part_set`` as RELION 3.1 STAR for the engine.

    Image names are Scipion's locations (relative to the project folder, where the engine
    runs, or absolute). A stack whose path holds whitespace or quotes, which STAR readers
    split differently, is referenced through a symbolic link with a plain name in
    ``stacks/`` next to the STAR file (the images are not copied).
    """
    links = _plain_links(stack_files(part_set), os.path.join(os.path.dirname(star_file), "stacks"))

    def fix_image_name(part, row):
        index, filename = part.getLocation()
        filename = _SCIPION_SUFFIX.sub("", filename)
        row["rlnImageName"] = _relion_convert().locationToRelion(index, links.get(filename, filename))

    _relion_convert().writeSetOfParticles(
        part_set, star_file, alignType=ALIGN_NONE, postprocessImageRow=fix_image_name, extraLabels=[]
    )


def _plain_links(files, folder: str) -> dict:
    """{file: link} for the files whose names need quoting in STAR; links are made in ``folder``."""
    links = {}
    for i, path in enumerate(f for f in files if _NEEDS_QUOTES.search(f)):
        os.makedirs(folder, exist_ok=True)
        extension = os.path.splitext(path)[1]
        if not _PLAIN_EXTENSION.fullmatch(extension):
            extension = ".mrcs"
        link = os.path.join(folder, f"stack_{i + 1:05d}{extension}")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.abspath(path), link)
        links[path] = link
    return links


def read_star_rows(star_file: str, block: str = "particles") -> dict:
    """Rows of a STAR block keyed by ``rlnImageId`` (emtable rows, RELION column types)."""
    from emtable import Table

    labels = Domain.importFromPlugin("relion.constants", "LABELS_DICT", doRaise=True)
    rows = {}
    for row in Table.iterRows(f"{block}@{star_file}", types=labels):
        rows[int(row.rlnImageId)] = row
    return rows


SCORE_LABELS = ("rlnLogLikeliContribution", "rlnMaxValueProbDistribution")


def fill_refined_sets(input_set, used_set, unused_set, rows: dict, pixel_size: float) -> tuple[int, int]:
    """Split ``input_set`` into the particles the engine used and those it did not.

    used_set gets the engine's poses (3D alignment, shifts in input pixels),
    ``_rlnRandomSubset`` (1 or 2) and the score (``_rlnLogLikeliContribution``,
    ``_rlnMaxValueProbDistribution``) on every item; unused_set gets the other particles as
    they were. objIds are kept. Returns (n_used, n_unused).
    """
    reader = _relion_convert().createReader(alignType=ALIGN_PROJ, pixelSize=pixel_size)
    n_used = n_unused = 0
    for part in input_set.iterItems(orderBy="id"):
        row = rows.get(part.getObjId())
        if row is None:
            unused_set.append(part)
            n_unused += 1
            continue
        refined = part.clone()  # the iterator reuses one object: never modify it
        refined.setTransform(Transform())
        reader.setParticleTransform(refined, row)
        refined._rlnRandomSubset = Integer(int(row.rlnRandomSubset))
        for label in SCORE_LABELS:  # the engine's per-particle score: subsets can select on it
            if hasattr(row, label):
                setattr(refined, f"_{label}", Float(float(getattr(row, label))))
        used_set.append(refined)
        n_used += 1
    return n_used, n_unused
