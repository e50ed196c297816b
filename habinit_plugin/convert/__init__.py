"""Between Scipion objects and the engine's files.

``command`` builds the engine's shell command (no Scipion imports); ``particles``
converts particle sets to and from RELION STAR through scipion-em-relion.
"""
