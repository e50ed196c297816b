"""The protocol's form and the viewer as a user sees them: real Tk windows on a virtual display (Xvfb).

The form is pyworkflow's ``FormWindow`` for a new run of our protocol (input set chosen, expert
level switched to Advanced as a user would, every tab shown); each parameter must be on screen
with its label and a Help button whose pop-up shows the parameter's help. The viewer is opened
with ``viewer.visualize(run)`` on a finished run, and every "eye" button is pressed: each opens a
matplotlib window that must draw data (curves, images, points) and non-blank pixels.

Screenshots (PNG) go to the test's tmp_path and to ``$HABINIT_SCREENSHOTS`` (default
``tests/output/screenshots/``, git-ignored) for a person to look at. Needs ``Xvfb``
(``apt-get install -y xvfb``); skips without it.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import features

tk = pytest.importorskip("tkinter", reason="this Python has no Tk (tkinter): Scipion's GUI cannot open")
XVFB = shutil.which("Xvfb")
SCREEN_PX = (2000, 1200)  # the viewer and its four plot windows side by side
pytestmark = [
    pytest.mark.skipif(
        XVFB is None, reason="Xvfb is not installed (apt-get install -y xvfb): the GUI tests need a virtual display"
    ),
    pytest.mark.skipif(
        not features.check("xcb"), reason="Pillow was built without XCB: ImageGrab cannot take screenshots"
    ),
]
DEFAULT_SCREENSHOTS = Path(__file__).resolve().parents[1] / "output" / "screenshots"


# ----------------------------------------------------------------------------- display and screenshots


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    """A virtual X display (``:N``, a free N chosen by Xvfb) that DISPLAY points at for the module."""
    read_fd, write_fd = os.pipe()
    width, height = SCREEN_PX
    xvfb = subprocess.Popen(
        [XVFB, "-displayfd", str(write_fd), "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    number = ""
    while not number.endswith("\n") and select.select([read_fd], [], [], 20)[0]:
        number += os.read(read_fd, 32).decode()
    if not number.strip().isdigit():
        xvfb.kill()
        pytest.fail(f"Xvfb ({XVFB}) did not report a display number within 20 s")
    name = f":{number.strip()}"
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DISPLAY", name)
            yield name
    finally:
        close_tk_windows()  # Xlib ends the whole process (XIO error) when the server goes before a Tk client
        xvfb.terminate()
        xvfb.wait(timeout=10)
        os.close(read_fd)  # only now: Xvfb stops ("Cannot write display number") if it closes early


def close_tk_windows() -> None:
    """Close matplotlib's windows and tkinter's default root, if any are still open."""
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
    root = getattr(tk, "_default_root", None)
    if root is not None:
        root.destroy()
    if "pyworkflow.gui.gui" in sys.modules:
        sys.modules["pyworkflow.gui.gui"].image_cache.clear()


@pytest.fixture(scope="module")
def screenshot_dirs(tmp_path_factory) -> list[Path]:
    """Where screenshots are written: the test's tmp folder, and $HABINIT_SCREENSHOTS or tests/output/screenshots."""
    stable = Path(os.environ.get("HABINIT_SCREENSHOTS") or DEFAULT_SCREENSHOTS)
    folders = [tmp_path_factory.mktemp("screenshots"), stable]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def settle(*widgets: tk.Misc, seconds: float = 0.3) -> None:
    """Run the Tk event loops of ``widgets`` (several Tcl interpreters) for about ``seconds``."""
    end = time.monotonic() + seconds
    while True:
        for widget in widgets:
            widget.update()
        if time.monotonic() > end:
            return
        time.sleep(0.02)


def grab(widget: tk.Misc, display: str):
    """Screenshot of ``widget``'s area of the screen (a PIL RGB image of the widget's width x height in px)."""
    from PIL import ImageGrab

    widget.update()
    x, y = widget.winfo_rootx(), widget.winfo_rooty()
    return ImageGrab.grab(bbox=(x, y, x + widget.winfo_width(), y + widget.winfo_height()), xdisplay=display)


def save(image, name: str, folders: list[Path]) -> list[Path]:
    paths = [folder / name for folder in folders]
    for path in paths:
        image.save(path)
    return paths


def close_window(window) -> None:
    """Destroy a pyworkflow window with its Tk root, and pyworkflow's image cache, whose images belong to that root."""
    import pyworkflow.gui.gui

    window.root.master.destroy()
    pyworkflow.gui.gui.image_cache.clear()


def descendants(widget: tk.Misc) -> Iterator[tk.Misc]:
    for child in widget.winfo_children():
        yield child
        yield from descendants(child)


def button_with_text(frame: tk.Misc | None, text: str) -> tk.Button:
    """The button labelled ``text`` in ``frame`` (pyworkflow's icon buttons keep their text as the option)."""
    found = [w for w in descendants(frame) if isinstance(w, tk.Button) and w.cget("text") == text] if frame else []
    assert len(found) == 1, f"{len(found)} buttons labelled {text!r} in {frame}"
    return found[0]


def pixel_spread(image) -> tuple[float, float]:
    """(standard deviation of the grey levels, fraction of pixels darker than 200 of 255) of an RGB image."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    return float(grey.std()), float((grey < 200).mean())


def words(text: str) -> list[str]:
    return text.replace("*", "").split()


# ----------------------------------------------------------------------------- the form


def form_params(protocol) -> Iterator[tuple[str, object, object]]:
    """(name, param, section) of every parameter that the form shows in its tabs (hidden ones excluded)."""
    import pyworkflow.protocol.params as params

    for section in protocol.iterDefinitionSections():
        if section.getLabel() in ("General", "Parallelization"):
            continue
        for name, param in section.iterParams():
            if isinstance(param, (params.Group, params.Line)):
                for inner, inner_param in param.iterParams():
                    yield inner, inner_param, section
            elif param.condition.get() != "False":  # addHidden's parameters, shown in the header instead
                yield name, param, section


def read_help_popup(window, widget, display: str, shots: list | None = None) -> str:
    """Press the parameter's Help button; return the title and text of the pop-up it opens (then closed).

    The pop-up is modal (it runs its own event loop until closed), so it is read and closed from a
    timer. A screenshot of it is appended to ``shots`` when a list is given.
    """
    before = {str(w) for w in descendants(window.root) if isinstance(w, tk.Toplevel)}
    found: list[str] = []

    def read_and_close(tries: int = 0) -> None:
        popups = [w for w in descendants(window.root) if isinstance(w, tk.Toplevel) and str(w) not in before]
        # the pop-up grabs the input just before it waits for the user: read it then, not while it is mapped
        if not (popups and popups[0].grab_status()) and tries < 100:
            window.root.after(50, read_and_close, tries + 1)
            return
        if not popups:
            return
        popup = popups[0]
        texts = [w.get("1.0", "end") for w in descendants(popup) if isinstance(w, tk.Text)]
        found.append(popup.title() + "\n" + "\n".join(texts))
        if shots is not None:
            settle(popup, seconds=0.2)
            shots.append(grab(popup, display))
        popup.destroy()

    window.root.after(50, read_and_close)
    button_with_text(widget.btnFrame, "Help").invoke()
    assert found, f"the Help button of {widget.paramName!r} opened no pop-up"
    return found[0]


def open_form(protocol):
    """The protocol's form as the project window opens it ("Protocol Run: <class>"), at the top left of the screen."""
    import pyworkflow.gui.project  # noqa: F401  (pyworkflow.gui.form is importable only after it)
    from pyworkflow.gui.form import FormWindow
    from pyworkflow.utils import Message

    window = FormWindow(Message.TITLE_NAME_RUN + protocol.getClassName(), protocol, callback=lambda *args: None)
    window.root.deiconify()
    fit_on_screen(window)
    return window


def fit_on_screen(window) -> None:
    """Size the form to its content (as pyworkflow does when a tab or level changes), at the top left."""
    window.adjustSize()
    window.root.geometry("+0+0")
    settle(window.root)


def set_expert_level(window, level: str) -> None:
    """Click the form's expert-level radio button ``level`` ('Normal' or 'Advanced')."""
    from pyworkflow.utils import Message

    buttons = [w for w in descendants(window.root) if isinstance(w, tk.Radiobutton) and w.cget("text") == level]
    assert buttons, f"no '{level}' choice for {Message.LABEL_EXPERT} on the form"
    buttons[0].invoke()
    fit_on_screen(window)


def select_tab(window, frame) -> None:
    """Click the tab of section ``frame`` (a pyworkflow SectionWidget in the form's notebook)."""
    from tkinter import ttk

    (notebook,) = [w for w in descendants(window.root) if isinstance(w, ttk.Notebook)]
    notebook.select(frame)
    fit_on_screen(window)


def visible_in(widget: tk.Misc, area: tk.Misc) -> bool:
    """True when ``widget`` is mapped and lies wholly inside ``area`` on the screen (not scrolled or cut off)."""
    if not widget.winfo_ismapped():
        return False
    x, y, w, h = widget.winfo_rootx(), widget.winfo_rooty(), widget.winfo_width(), widget.winfo_height()
    ax, ay = area.winfo_rootx(), area.winfo_rooty()
    return ax <= x and ay <= y and x + w <= ax + area.winfo_width() and y + h <= ay + area.winfo_height()


def check_param_on_screen(window, name: str, param, frame, level: str, display: str, help_shots: list) -> None:
    """Parameter ``name`` on the selected tab ``frame``: its label widget, on screen exactly when its expert
    level and condition allow; at Advanced, its Help button pops up its help (screenshot of initialResolution's)."""
    from pyworkflow.gui.form import ParamWidget

    widget = window.widgetDict[name]
    assert isinstance(widget, ParamWidget)
    text = param.label.get()
    assert text and widget.label.cget("text") == text, name
    expected = window.protocol.evalParamCondition(name) and (level == "Advanced" or not param.isExpert())
    assert visible_in(widget.label, frame) == expected, f"{name!r} ({text!r}) at {level} level"
    if level == "Advanced":
        help_text = param.help.get() or ""
        assert len(help_text.split()) >= 5, f"{name!r} ({text!r}) has no help text"
        popup = read_help_popup(window, widget, display, help_shots if name == "initialResolution" else None)
        assert words(popup.split("\n", 1)[1]) == words(help_text), f"help pop-up of {name!r}: {popup!r}"


def test_form_shows_every_parameter_with_label_and_help(project, relion_run, display, screenshot_dirs):
    """Each tab at each expert level: the parameters of that level on screen with their labels; at Advanced
    every parameter is there and its Help button pops up its help text."""
    from habinit_plugin.protocols import ProtHabinitHomoAbinitRefine
    from habinit_plugin.protocols.protocol_homo_abinit import FORM_TEXT

    imported, _ = relion_run
    protocol = project.newProtocol(ProtHabinitHomoAbinitRefine)
    protocol.inputParticles.set(imported.outputParticles)
    shown = list(form_params(protocol))
    assert set(FORM_TEXT) | {"inputParticles", "quickSchedule"} <= {name for name, _, _ in shown}
    window = open_form(protocol)
    try:
        sections = {frame.section.getLabel(): frame for frame in window._sections}
        assert set(sections) == {section.getLabel() for _, _, section in shown}
        help_shots: list = []
        for level in ("Normal", "Advanced"):
            set_expert_level(window, level)
            for tab, (label, frame) in enumerate(sections.items()):
                select_tab(window, frame)
                save(
                    grab(window.root, display),
                    f"form_{level.lower()}_{tab + 1}_{label.replace(' ', '_')}.png",
                    screenshot_dirs,
                )
                for name, param, section in shown:
                    if section.getLabel() == label:
                        check_param_on_screen(window, name, param, frame, level, display, help_shots)
        assert len(help_shots) == 1, "no screenshot of the help pop-up of 'initialResolution'"
        save(help_shots[0], "form_help_popup.png", screenshot_dirs)

        # the header holds the hidden useGpu/gpuList as "GPU IDs" (Yes/No and the IDs) and the threads
        header = [w.cget("text") for w in descendants(window.root) if isinstance(w, tk.Label)]
        assert "GPU IDs" in header and "Threads" in header, header
    finally:
        close_window(window)


# ----------------------------------------------------------------------------- the viewer


def axes_data_points(figure) -> int:
    """Number of finite data values drawn in ``figure``: line vertices, image pixels with contrast, points."""
    total = 0
    for axes in figure.axes:
        for line in axes.get_lines():
            xy = np.asarray(line.get_xydata(), dtype=float)
            total += int(np.isfinite(xy).all(axis=1).sum()) if len(xy) > 1 else 0
        for image in axes.get_images():
            array = np.ma.filled(np.asarray(image.get_array(), dtype=float), np.nan)
            total += int(np.isfinite(array).sum()) if np.nanstd(array) > 0 else 0
        for collection in axes.collections:
            offsets = np.ma.filled(np.asarray(collection.get_offsets(), dtype=float), np.nan)
            array = collection.get_array()
            total += int(np.isfinite(offsets).all(axis=1).sum()) if len(offsets) > 1 else 0
            total += (
                int(np.isfinite(np.ma.filled(np.asarray(array, dtype=float), np.nan)).sum()) if array is not None else 0
            )
    return total


@pytest.fixture
def tk_plots():
    """matplotlib on TkAgg (as Scipion's project window sets it) for the test; Agg again afterwards."""
    import matplotlib.pyplot as plt
    from pyworkflow.gui.plotter import Plotter

    previous = Plotter.backend
    Plotter.setBackend("TkAgg")
    yield plt
    plt.close("all")
    Plotter.setBackend("Agg")
    Plotter.backend = previous


# fewest finite data values each plot must draw for the session's run (box 32, 300 particles, quick schedule)
# (curve points of one FSC, pixels of 6 slices, 2 SGD + 2 pass points, rot x tilt bins of the coarsest histogram)
MIN_DATA_VALUES = {"fsc": 16, "slices": 6 * 32 * 32, "history": 4, "angular": 12 * 6}


def test_viewer_draws_its_plots(project, relion_run, display, screenshot_dirs, tk_plots, monkeypatch):
    import pyworkflow as pw
    import pyworkflow.gui.project  # noqa: F401  (pyworkflow.gui.form is importable only after it)
    from pyworkflow.gui.form import FormWindow
    from pyworkflow.utils import Message
    from pyworkflow.viewer import DESKTOP_TKINTER

    from habinit_plugin.viewers import HabinitHomoAbinitViewer

    plt = tk_plots
    _, run = relion_run
    # as the project window's "Analyze Results": the first viewer the domain finds for the run
    viewers = pw.Config.getDomain().findViewers(run, DESKTOP_TKINTER)
    assert viewers and viewers[0] is HabinitHomoAbinitViewer, viewers
    viewer = viewers[0](project=project, protocol=run)
    # visualize() opens the viewer's window and enters Tk's main loop: here it only maps the window
    monkeypatch.setattr(FormWindow, "show", lambda self, center=True, modal=False: self.root.deiconify())
    viewer.visualize(run)
    form = viewer.formWindow
    form.root.geometry("+0+0")
    settle(form.root)
    save(grab(form.root, display), "viewer_form.png", screenshot_dirs)
    try:
        windows = {}
        for param, (name, title) in viewer.PLOTS.items():
            before = set(plt.get_fignums())
            button_with_text(form.widgetDict[param].btnFrame, Message.LABEL_BUTTON_VIS).invoke()
            (number,) = set(plt.get_fignums()) - before
            figure = plt.figure(number)
            manager = figure.canvas.manager
            assert manager.get_window_title() == title
            settle(form.root, manager.window, seconds=0.5)
            windows[name] = manager
            n_values = axes_data_points(figure)
            assert n_values >= MIN_DATA_VALUES[name], f"the {name!r} plot draws {n_values} data values"
            if name == "angular":  # the histogram counts every particle used once
                counts = np.asarray(figure.axes[0].collections[0].get_array())
                assert counts.sum() == run.outputParticles.getSize()
            image = grab(figure.canvas.get_tk_widget(), display)
            width, height = figure.get_size_inches() * figure.dpi
            assert abs(image.width - width) <= 0.05 * width and abs(image.height - height) <= 0.05 * height
            spread, inked = pixel_spread(image)
            assert spread > 20 and inked > 0.02, f"{name!r} plot window looks blank: sd {spread:.1f}, {inked:.3f} inked"
            save(image, f"viewer_{name}.png", screenshot_dirs)
        save(arrange_viewer_screen(form, windows, display), "viewer_screen.png", screenshot_dirs)
    finally:
        close_window(form)


def arrange_viewer_screen(form, windows: dict, display: str):
    """The viewer's window and its four plot windows tiled on the screen, as one screenshot (cropped to them)."""
    from PIL import ImageGrab

    gap_px = 10
    form_w, form_h = form.root.winfo_width(), form.root.winfo_height()
    fsc_w = windows["fsc"].window.winfo_width()
    top_h = max(form_h, windows["fsc"].window.winfo_height(), windows["history"].window.winfo_height())
    positions = {
        "fsc": (form_w + gap_px, 0),
        "history": (form_w + fsc_w + 2 * gap_px, 0),
        "slices": (0, top_h + gap_px),
        "angular": (windows["slices"].window.winfo_width() + gap_px, top_h + gap_px),
    }
    for name, (x, y) in positions.items():
        windows[name].window.geometry(f"+{x}+{y}")
    settle(form.root, *(m.window for m in windows.values()), seconds=0.5)
    right = max(m.window.winfo_rootx() + m.window.winfo_width() for m in windows.values())
    bottom = max(m.window.winfo_rooty() + m.window.winfo_height() for m in windows.values())
    return ImageGrab.grab(bbox=(0, 0, right, bottom), xdisplay=display)
