"""The habinit engine: gold-standard SGD ab initio on NumPy (CPU) or CuPy (GPU).

No Scipion imports here or below: the engine runs in any Python with NumPy,
SciPy, mrcfile and emtable (``habinit --help``).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
