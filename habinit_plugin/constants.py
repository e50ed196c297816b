"""Names shared by the Scipion side of the plugin (no Scipion imports here)."""

# Plugin variables (read from the environment or the Scipion config file)
HABINIT_PYTHON = "HABINIT_PYTHON"  # interpreter that runs the engine (default: the one running Scipion)
HABINIT_ENV_ACTIVATION = "HABINIT_ENV_ACTIVATION"  # optional shell command run before the engine (e.g. conda activate)
HABINIT_CUPY_ENV = "habinit-cupy"  # name of the optional CuPy environment that `scipion installb` can create

ENGINE_MODULE = "habinit_plugin.engine"

# Engine output files (in the protocol's extra/ folder, see engine/outputs.py)
ENGINE_DIR = "habinit"
INPUT_STAR = "input_particles.star"
HALF_MAP_A = "half_map_A.mrc"
HALF_MAP_B = "half_map_B.mrc"
AVERAGE_MAP = "map.mrc"
PARTICLES_STAR = "particles.star"
UNUSED_STAR = "unused_particles.star"
FSC_JSON = "fsc.json"
FSC_STAR = "fsc.star"
RUN_JSON = "run.json"
PLOTS = {
    "fsc": "fsc.png",
    "history": "resolution_per_iteration.png",
    "angular": "angular_distribution.png",
    "slices": "half_map_slices.png",
}

# Fewer particles per half than this cannot give a meaningful map
MIN_PARTICLES = 20
