"""Scipion viewer of a homogeneous ab-initio refinement run: FSC, half maps, convergence, angles."""

from __future__ import annotations

import pyworkflow.protocol.params as params
from pyworkflow.gui.plotter import Plotter
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from ..figures import FIGURES
from ..protocols import ProtHabinitHomoAbinitRefine


class HabinitHomoAbinitViewer(ProtocolViewer):
    """Plots of a homogeneous ab-initio refinement run (the same ones the engine writes as PNG)."""

    _label = "viewer homogeneous ab-initio refinement"
    _targets = [ProtHabinitHomoAbinitRefine]
    _environments = [DESKTOP_TKINTER]

    PLOTS = {
        "displayFsc": ("fsc", "Gold-standard FSC between the half maps"),
        "displaySlices": ("slices", "Central slices of both half maps"),
        "displayHistory": ("history", "Resolution per iteration"),
        "displayAngularDistribution": ("angular", "Angular distribution of the particles"),
    }

    def _defineParams(self, form):
        form.addSection(label="Results")
        for param, (_, label) in self.PLOTS.items():
            form.addParam(param, params.LabelParam, label=label)

    def _getVisualizeDict(self):
        return {param: self._showPlot for param in self.PLOTS}

    def _showPlot(self, paramName=None):
        name, title = self.PLOTS[paramName]
        return [self.plotter(name, title)]

    def plotter(self, name: str, title: str = "") -> Plotter:
        """A Plotter holding figure ``name`` ('fsc', 'slices', 'history', 'angular')."""
        size, draw = FIGURES[name]
        plotter = Plotter(figsize=size, windowTitle=title)
        draw(plotter.getFigure(), self.protocol._getExtraPath())
        plotter.tightLayout()
        return plotter
