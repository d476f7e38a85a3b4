"""`GroupedAdamW`: AdamW with per-group learning-rate multipliers (PyTorch param groups).

Proxy-based DML trains the class proxies with a learning rate 100 times the
backbone's (Kim et al. 2020, section 4) and warms up with the backbone frozen; Keras
optimizers have one learning rate, so this subclass scales it per variable group.
"""

from __future__ import annotations

import re
from typing import Dict, Optional

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="kdml")
class GroupedAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate is multiplied per group of variables.

    A variable belongs to the first group whose regular expression matches its
    `variable.path` (`re.search`), e.g. "proxies" or "^backbone/"; variables in no
    group use the base learning rate. The multiplier scales the Adam step and the
    decoupled weight decay alike, as a PyTorch param group with its own `lr` does.
    Multipliers are optimizer variables, so `set_multiplier` changes them between
    steps without retracing (a warm-up sets the backbone's to 0, then back to 1),
    and checkpoints carry them.

    A group whose multiplier is 0 is frozen, as a PyTorch parameter without
    gradient: its variables, Adam moments (m, v) and weight decay are left as they
    are, and its step count t (Adam's bias correction 1 - beta^t) pauses, so the
    first steps after a warm-up are Adam's first steps, not uncorrected ones.

    Args:
        learning_rate_multipliers: dict {regex: float}, checked in order.
        **kwargs: `keras.optimizers.AdamW` arguments.
    """

    def __init__(self, learning_rate_multipliers: Optional[Dict[str, float]] = None, **kwargs):
        super().__init__(**kwargs)
        self.learning_rate_multipliers = dict(learning_rate_multipliers or {})
        for pattern in self.learning_rate_multipliers:
            re.compile(pattern)
        self._group_of_variable = []
        self._multipliers = []
        self._group_steps = []

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        patterns = list(self.learning_rate_multipliers)
        self._multipliers = [
            self.add_variable(
                shape=(), initializer=keras.initializers.Constant(value),
                dtype="float32", name=f"lr_multiplier_{i}")
            for i, value in enumerate(self.learning_rate_multipliers.values())
        ]
        # Steps each group has taken (multiplier > 0): its Adam step count t.
        self._group_steps = [
            self.add_variable(shape=(), initializer="zeros", dtype="int64",
                              aggregation="only_first_replica", name=f"group_steps_{i}")
            for i in range(len(patterns))
        ]
        self._group_of_variable = [
            next((i for i, p in enumerate(patterns) if re.search(p, v.path)), -1)
            for v in var_list
        ]

    def set_multiplier(self, pattern: str, value: float):
        """Sets the learning-rate multiplier of the group `pattern` (after `build`)."""
        if pattern not in self.learning_rate_multipliers:
            raise ValueError(
                f"No learning-rate group {pattern!r}. Groups: {list(self.learning_rate_multipliers)}")
        self._multipliers[list(self.learning_rate_multipliers).index(pattern)].assign(value)

    def multiplier(self, pattern: str) -> float:
        return float(self._multipliers[list(self.learning_rate_multipliers).index(pattern)].numpy())

    def _multiplier_of(self, variable, dtype):
        group = self._group_of_variable[self._get_variable_index(variable)]
        if group < 0:
            return None
        return tf.cast(self._multipliers[group], dtype)

    def group_steps(self, pattern: str) -> int:
        """Steps the group `pattern` has taken with a multiplier above 0."""
        return int(self._group_steps[list(self.learning_rate_multipliers).index(pattern)].numpy())

    def apply(self, grads, trainable_variables=None):
        if len(grads) == 0:
            return
        super().apply(grads, trainable_variables)
        for multiplier, steps in zip(self._multipliers, self._group_steps):
            steps.assign_add(tf.cast(multiplier > 0, steps.dtype))

    def update_step(self, gradient, variable, learning_rate):
        group = self._group_of_variable[self._get_variable_index(variable)]
        if group < 0:
            return super().update_step(gradient, variable, learning_rate)
        multiplier = tf.cast(self._multipliers[group], learning_rate.dtype)
        step = self._group_steps[group] + 1

        def adam_step():
            self._adam_step(gradient, variable, learning_rate * multiplier, step)
            return tf.constant(True)

        tf.cond(multiplier > 0, adam_step, lambda: tf.constant(False))

    def _adam_step(self, gradient, variable, learning_rate, local_step):
        """`keras.optimizers.Adam.update_step` with the group's step count `local_step`
        in the bias correction (Kingma & Ba 2015, Algorithm 1) instead of `iterations`."""
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        gradient = tf.cast(gradient, dtype)
        local_step = tf.cast(local_step, dtype)
        beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), local_step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), local_step)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        self.assign_add(m, (gradient - m) * (1 - self.beta_1))
        self.assign_add(v, (tf.square(gradient) - v) * (1 - self.beta_2))
        if self.amsgrad:
            v_hat = self._velocity_hats[self._get_variable_index(variable)]
            self.assign(v_hat, tf.maximum(v_hat, v))
            v = v_hat
        self.assign_sub(variable, m * alpha / (tf.sqrt(v) + self.epsilon))

    def _apply_weight_decay(self, variables):
        # AdamW's decoupled decay `v -= v * wd * lr`, with this variable's group lr.
        if self.weight_decay is None:
            return

        def decay(distribution, variables):
            def decay_one(variable):
                if self._use_weight_decay(variable):
                    lr = tf.cast(self.learning_rate, variable.dtype)
                    multiplier = self._multiplier_of(variable, variable.dtype)
                    if multiplier is not None:
                        lr = lr * multiplier
                    variable.assign_sub(variable * tf.cast(self.weight_decay, variable.dtype) * lr)

            for variable in variables:
                if isinstance(variable, keras.Variable):
                    variable = variable.value
                distribution.extended.update(variable, decay_one, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            decay, self._distribution_strategy, variables)

    def get_config(self):
        return {**super().get_config(),
                "learning_rate_multipliers": dict(self.learning_rate_multipliers)}
