"""Helpers of render_dashboard.py and the dashboard tests.

- `train_demo_run`: a short DP training of a tiny model on synthetic
  CheXpert-shaped data with a planted gap between the sexes, logged with
  `keras.callbacks.TensorBoard` and `dashboards.callback.FairnessDashboard`.
- `tensorboard_server`: a real TensorBoard on a free loopback port, always
  stopped on exit.
- `screenshot_custom_scalars`: headless Chromium renders TensorBoard's
  custom-scalars page, legends open, to a PNG.
"""

import base64
import contextlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import keras
from PIL import Image

import tf_dpfair as dpf
from tf_dpfair.dashboards import callback
from tf_dpfair.data import pipeline
from tf_dpfair.datasets import synthetic

# Female examples carry a weaker signal: a gap the dashboard must show.
PLANTED_SIGNAL = {"sex": {"female": 0.35}, "age": {"80+": 0.6}}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def train_demo_run(log_dir, *, noise_multiplier=1.0, epochs=2, steps_per_epoch=2,
                   num_train=512, num_eval=256, batch_size=128, image_size=8,
                   learning_rate=2.0, ema_decay=0.9, target_epsilon=20.0, n_bootstrap=50,
                   seed=0):
    """Trains a linear multi-label model privately and logs the dashboards.

    Args:
        log_dir: the run's log directory (e.g. `<sweep>/eps_2`).
        noise_multiplier: sigma; 0 gives a non-private run.
        epochs: epochs of `steps_per_epoch` optimizer updates each.
        steps_per_epoch: updates per epoch.
        num_train: training examples (synthetic).
        num_eval: held-out examples, for validation and exact evaluation.
        batch_size: expected logical batch (Poisson sampling).
        image_size: side of the synthetic images.
        learning_rate: SGD learning rate.
        ema_decay: EMA decay, or None for no EMA.
        target_epsilon: the budget given to `PrivacyLogger` (recorded in HParams);
            ignored for a non-private run.
        n_bootstrap: bootstrap replicates of the exact evaluation.
        seed: seed of the data and the sampling.

    Returns:
        `(history, model, dashboard)`.
    """
    sources = synthetic.load(num_train=num_train, num_test=num_eval, seed=seed,
                             image_size=image_size, signal=0.6, noise_std=0.2,
                             group_signal=PLANTED_SIGNAL)
    train = pipeline.make_train_dataset(sources["train"], expected_batch_size=batch_size,
                                    seed=seed, microbatch_size=batch_size // 2)
    held_out = pipeline.make_eval_dataset(sources["test"], batch_size=batch_size)
    groups = sources["test"].group_spec
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=noise_multiplier,
                          expected_batch_size=batch_size, microbatch_size=batch_size // 2,
                          ema_decay=ema_decay, seed=seed)
    inputs = keras.Input((image_size, image_size, 1))
    # Centred pixels: the grey background then adds nothing to the logits.
    centred = keras.layers.Rescaling(1.0, offset=-0.5)(inputs)
    outputs = keras.layers.Dense(len(synthetic.LABELS))(keras.layers.Flatten()(centred))
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    label_names = [name.replace(" ", "_") for name in synthetic.LABELS]
    model.compile(optimizer=keras.optimizers.SGD(learning_rate),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[dpf.fairness.streaming_auc.GroupedAUC(groups.to_dict(), label_names=label_names,
                                                  from_logits=True, num_thresholds=500)])
    # A non-private run has no finite epsilon, so no budget to hold it to.
    budget = target_epsilon if noise_multiplier > 0 else None
    privacy = dpf.callbacks.PrivacyLogger(sampling_spec=train.spec, delta=0.1 / num_train,
                                          target_epsilon=budget, verbose=0)
    callbacks = [privacy]
    if ema_decay is not None:
        callbacks.append(dpf.callbacks.EMAEvaluation(held_out))
    dashboard = callback.FairnessDashboard(
        log_dir, privacy_logger=privacy, hparams={"learning_rate": learning_rate},
        evaluation_data=held_out, group_names=groups, n_bootstrap=n_bootstrap)
    callbacks += [dashboard, keras.callbacks.TensorBoard(log_dir)]
    history = model.fit(train.dataset, steps_per_epoch=steps_per_epoch, epochs=epochs,
                        validation_data=held_out, callbacks=callbacks, verbose=0)
    return history, model, dashboard


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch(url, body=None, timeout=10):
    """GETs (or POSTs `body` as JSON to) `url`; returns the decoded JSON.

    Raises:
        urllib.error.URLError: the server did not answer or answered an error.
    """
    request = urllib.request.Request(url)
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def wait_for(condition, *, timeout=60.0, interval=0.5, what="condition"):
    """Polls `condition()` until it returns a truthy value; returns that value.

    Exceptions from `condition` count as "not yet" (the server may still be
    starting).

    Raises:
        TimeoutError: `timeout` seconds passed first.
    """
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (OSError, ValueError, KeyError) as error:
            last_error = error
        time.sleep(interval)
    raise TimeoutError(f"Gave up waiting for {what} after {timeout:.0f} s "
                       f"(last error: {last_error!r}).")


@contextlib.contextmanager
def tensorboard_server(log_dir, *, port=None, timeout=60.0):
    """Runs `tensorboard --logdir log_dir` on 127.0.0.1 until the block ends.

    The server runs in its own process group, which is terminated (then
    killed) on exit, whatever happens in the block.

    Args:
        log_dir: the directory TensorBoard reads.
        port: the port (default: a free one).
        timeout: seconds to wait for the server to answer.

    Yields:
        The base URL, e.g. "http://127.0.0.1:6123".

    Raises:
        TimeoutError: the server did not answer in time.
        RuntimeError: the server exited (its output is in either message).
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    output = tempfile.TemporaryFile()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir),
               "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"]
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    def answering():
        if process.poll() is not None:
            raise RuntimeError(f"TensorBoard exited with status {process.returncode}.")
        return fetch(url + "/data/runs") is not None

    try:
        try:
            wait_for(answering, timeout=timeout, what=f"TensorBoard at {url}")
        except (TimeoutError, RuntimeError) as error:
            output.seek(0)
            log = output.read().decode(errors="replace")[-4000:]
            raise type(error)(f"{error}\n{log}") from None
        yield url
    finally:
        _stop(process)
        output.close()


def _stop(process):
    """Terminates the process group of `process`, killing it if it lingers."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe.

    `--remote-debugging-pipe` makes Chromium read NUL-terminated JSON
    commands on fd 3 and answer on fd 4, so no network port or websocket
    library is needed. Use as a context manager; Chromium (its whole
    process group) is always stopped on exit.

    Args:
        window_size: (width, height) of the page in pixels.
        chromium: the Chromium executable.
        timeout: seconds any one command may take.
    """

    def __init__(self, window_size=(1500, 1100), chromium="chromium", timeout=60.0):
        self.window_size = window_size
        self.chromium = chromium
        self.timeout = timeout
        self._buffer = b""
        self._id = 0

    def __enter__(self):
        self._profile = tempfile.TemporaryDirectory()
        to_browser, self._write_fd = os.pipe()
        self._read_fd, from_browser = os.pipe()

        def use_fds_3_and_4():
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        width, height = self.window_size
        command = [self.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}",
                   "--remote-debugging-pipe", f"--window-size={width},{height}", "about:blank"]
        self._process = subprocess.Popen(
            command, preexec_fn=use_fds_3_and_4, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.call("Target.attachToTarget", targetId=target,
                                      flatten=True)["sessionId"]
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self._session = None
            self.call("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        _stop(self._process)
        os.close(self._write_fd)
        os.close(self._read_fd)
        self._profile.cleanup()

    def call(self, method, **params):
        """Sends one command (to the page once attached); returns its result.

        Raises:
            RuntimeError: Chromium reported an error or closed the pipe.
            TimeoutError: no answer within `timeout` seconds.
        """
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if getattr(self, "_session", None):
            message["sessionId"] = self._session
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([self._read_fd], [], [], remaining)[0]:
                    raise TimeoutError(f"Chromium did not answer {method} in {self.timeout} s.")
                chunk = os.read(self._read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe.")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression):
        """Runs JavaScript in the page; returns its (JSON) value."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def screenshot_png(self):
        """The page as PNG bytes."""
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])


# Finds elements through Polymer's shadow roots (TensorBoard's dashboards use them).
_DEEP_QUERY = """(selector) => { const found = [];
  const walk = (root) => root.querySelectorAll('*').forEach((e) => {
    if (e.matches(selector)) found.push(e);
    if (e.shadowRoot) walk(e.shadowRoot);
  });
  walk(document); return found; }"""


def screenshot_custom_scalars(url, png_path, *, window_size=(1920, 1560), run_regex="fairness",
                              timeout=90.0, max_colors=256):
    """Renders TensorBoard's custom-scalars page with every chart's legend open.

    The page draws with JavaScript after fetching data, and the names of a
    chart's lines are in its collapsed "Matches" list; so the page is
    driven over DevTools: wait until the charts are there, open each "Matches" list, then capture.

    Args:
        url: the TensorBoard base URL.
        png_path: where the PNG goes (palette PNG of `max_colors` colours,
            to keep it small).
        window_size: (width, height) of the page.
        run_regex: runs to show (TensorBoard's run filter).
        timeout: seconds to wait for the charts.
        max_colors: colours of the palette.

    Raises:
        TimeoutError: the charts did not appear in time.
    """
    toggles = f"({_DEEP_QUERY})('.toggle-matches-button')"
    with DevTools(window_size=window_size) as browser:
        browser.call("Page.enable")
        # Run filter and smoothing are read from the URL before any chart loads.
        query = urllib.parse.urlencode({"regexInput": run_regex, "_smoothingWeight": 0})
        browser.call("Page.navigate", url=f"{url}/#custom_scalars&{query}")
        counts = []

        def charts_settled():
            # Charts appear one after another: wait until the count holds still.
            counts.append(browser.evaluate(f"{toggles}.length"))
            return len(counts) > 3 and counts[-1] > 0 and counts[-1] == counts[-4]

        wait_for(charts_settled, timeout=timeout, what="the custom-scalars charts")
        browser.evaluate(f"{toggles}.forEach((button) => button.click())")
        time.sleep(3.0)  # Let the lists open and the charts redraw.
        png = browser.screenshot_png()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=max_colors).save(png_path, optimize=True)
