"""A progress line of headline figures for `fit`, every figure still logged.

Keras' progress bar prints every key of the logs. With per-group metrics
(`GroupedAUC`, `GroupedErrorRates`) and `GroupDiagnostics`, that is dozens of
figures per epoch. Their keys all hold a `/` (`auc/sex/female`,
`auc_gap/sex`, `train_diagnostics/...`); the headline figures do not: the
loss, the compiled metrics' overall values (`auc`, `tpr`, `accuracy`),
`epsilon` and the DP step's `clip_fraction`, with their `val_` versions.

`HeadlineProgbarLogger` prints only the headline keys. It filters a copy of
the logs it is handed, so `History`, `TensorBoard`, `CSVLogger` and every
other callback still receive every key. `HeadlineProgress`, mixed into the
package's models, gives `fit` this bar unless the caller passes a
`keras.callbacks.ProgbarLogger` of their own; `verbose` means what it means
in Keras (0 silent, 1 a bar, 2 one line per epoch). Given a `tf.data`
pipeline, `fit` passes Keras `shuffle=False`, which Keras ignores for
pipelines anyway, so that it does not warn about its default.
"""

import keras
import tensorflow as tf

SEPARATOR = "/"


def is_headline(key):
    """Whether a log key is a headline figure (no `/` in its name).

    >>> is_headline("val_auc"), is_headline("val_auc/sex/female")
    (True, False)
    """
    return SEPARATOR not in key


def headline(logs):
    """A new dict of the headline figures of `logs` (None stays None)."""
    if logs is None:
        return None
    return {key: value for key, value in logs.items() if is_headline(key)}


class HeadlineProgbarLogger(keras.callbacks.ProgbarLogger):
    """`keras.callbacks.ProgbarLogger` that prints only the headline figures.

    Per-group and diagnostic keys (those with a `/`) are left out of the
    printed line; the logs themselves are not changed, so other callbacks
    see every key.
    """

    # As Keras' own progress bar: it may run on Keras' callback thread.
    async_safe = True

    def on_train_batch_end(self, batch, logs=None):
        """Updates the bar with the batch's headline figures."""
        super().on_train_batch_end(batch, headline(logs))

    def on_test_batch_end(self, batch, logs=None):
        """Updates the bar of `evaluate` with the headline figures."""
        super().on_test_batch_end(batch, headline(logs))

    def on_epoch_end(self, epoch, logs=None):
        """Ends the epoch's line with its headline figures."""
        super().on_epoch_end(epoch, headline(logs))

    def on_test_end(self, logs=None):
        """Ends the line of `evaluate` with its headline figures."""
        super().on_test_end(headline(logs))


def with_headline_progbar(callbacks, verbose):
    """`fit`'s callbacks with a `HeadlineProgbarLogger` where Keras would add its bar.

    Args:
      callbacks: what was given to `fit`: None, a list or a
        `keras.callbacks.CallbackList` (returned unchanged: Keras adds
        nothing to one either).
      verbose: `fit`'s verbose; 0 prints nothing, so no bar is added.

    Returns:
      The callbacks, as a new list when a bar was added.
    """
    if verbose == 0 or isinstance(callbacks, keras.callbacks.CallbackList):
        return callbacks
    given = list(callbacks or [])
    if any(isinstance(c, keras.callbacks.ProgbarLogger) for c in given):
        return callbacks
    return given + [HeadlineProgbarLogger()]


class HeadlineProgress:
    """Mixin for `keras.Model` subclasses: `fit` prints the headline figures.

    Put it before `keras.Model` among the bases. `fit` gets a
    `HeadlineProgbarLogger` where Keras would add its own progress bar
    (`verbose` not 0, no `ProgbarLogger` among the callbacks); nothing else
    changes.
    """

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto",
            callbacks=None, validation_split=0.0, validation_data=None,
            shuffle=True, class_weight=None, sample_weight=None,
            initial_epoch=0, steps_per_epoch=None, validation_steps=None,
            validation_batch_size=None, validation_freq=1):
        """Like `keras.Model.fit`, with a progress line of headline figures."""
        # Keras ignores `shuffle` for a tf.data pipeline (the package's draws
        # its own batches) but warns about its default on every call.
        if isinstance(getattr(x, "dataset", x), tf.data.Dataset):
            shuffle = False
        return super().fit(
            x=x, y=y, batch_size=batch_size, epochs=epochs, verbose=verbose,
            callbacks=with_headline_progbar(callbacks, verbose),
            validation_split=validation_split,
            validation_data=validation_data, shuffle=shuffle,
            class_weight=class_weight, sample_weight=sample_weight,
            initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
            validation_steps=validation_steps,
            validation_batch_size=validation_batch_size,
            validation_freq=validation_freq)
