"""Names shared by the Scipion side of the plugin (no Scipion imports here).

The engine's output file names are habinit_plugin/engine/outputs.py's; its parameters are engine/settings.py's.
"""

DISPLAY_NAME = "habinit"  # the plugin's name in Scipion's menus and run names (the package is habinit_plugin)

# Plugin variables (read from the environment or the Scipion config file)
HABINIT_PYTHON = "HABINIT_PYTHON"  # interpreter that runs the engine (default: the one running Scipion)
HABINIT_ENV_ACTIVATION = "HABINIT_ENV_ACTIVATION"  # optional shell command run before the engine (e.g. conda activate)
HABINIT_CUPY_ENV = "habinit-cupy"  # name of the optional CuPy environment that `scipion installb` can create

ENGINE_MODULE = "habinit_plugin.engine"

INPUT_STAR = "input_particles.star"  # the input set as the engine reads it (in the protocol's extra/)
