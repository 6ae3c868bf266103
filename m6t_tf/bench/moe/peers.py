"""The peers: Model Garden's `MoeLayer` and Keras-Hub's `MixtralSparseMoeBlock`, if installed.

Both are optional (`make bench-setup` installs them, requirements-bench.txt): a peer that does
not import is reported with its reason, never fatal. They are imported by name at run time.

  model_garden  experts-choose routing, capacity factor k·γ, so the same E·C slots as our
                top-k (GeLU experts); a tf-keras layer
  keras_hub     SwiGLU experts, top-k, computes all E experts on every token; a Keras 3 layer
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os

# Model Garden's tokens/s targets by T (the issue's); other T get no target.
MG_TARGETS = {2048: 1.5, 8192: 3.5}
KH_TARGET = 5.0


def _version(dist: str):
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def import_peers(enabled: bool) -> tuple[dict, dict]:
  """Returns ({peer: status}, {peer: module}); a peer that does not import is reported, not
  fatal."""
  status, modules = {}, {}
  if not enabled:
    for name in ("model_garden", "keras_hub"):
      status[name] = {"available": False, "version": None, "how": None,
                      "reason": "--no_peers"}
    return status, modules
  # Keras-Hub: the Mixtral sparse MoE block (a Keras 3 layer).
  try:
    mod = importlib.import_module("keras_hub.src.models.mixtral.mixtral_decoder")
    getattr(mod, "MixtralSparseMoeBlock")
    modules["keras_hub"] = mod
    status["keras_hub"] = {"available": True, "version": _version("keras-hub"),
                           "how": "keras_hub.src.models.mixtral.mixtral_decoder"
                                  ".MixtralSparseMoeBlock", "reason": None}
  except Exception as e:  # ImportError, or any error their package __init__ raises
    status["keras_hub"] = {"available": False, "version": _version("keras-hub"), "how": None,
                           "reason": f"{type(e).__name__}: {e} (make bench-setup installs it)"}
  # Model Garden: official/nlp/modeling/layers/moe.py (a tf-keras layer).
  try:
    try:
      mod = importlib.import_module("official.nlp.modeling.layers.moe")
      how = "official.nlp.modeling.layers.moe"
    except ImportError as package_error:
      # official/nlp/modeling/__init__ imports every layer (mixing.py needs scipy, others more);
      # moe.py itself needs only tf-keras and official.modeling.tf_utils, so it is loaded alone
      # from the installed package.
      import official  # noqa: F401  (raises if tf-models-official is not installed)
      path = os.path.join(official.__path__[0], "nlp", "modeling", "layers", "moe.py")
      spec = importlib.util.spec_from_file_location("_model_garden_moe", path)
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      how = (f"official/nlp/modeling/layers/moe.py loaded by file (the package import fails: "
             f"{type(package_error).__name__}: {package_error})")
    for cls in ("MoeLayer", "FeedForwardExperts", "ExpertsChooseMaskedRouter"):
      getattr(mod, cls)
    modules["model_garden"] = mod
    status["model_garden"] = {"available": True, "version": _version("tf-models-official"),
                              "tf_keras": _version("tf-keras"), "how": how, "reason": None}
  except Exception as e:
    status["model_garden"] = {"available": False, "version": _version("tf-models-official"),
                              "how": None,
                              "reason": f"{type(e).__name__}: {e} (make bench-setup installs it)"}
  return status, modules


def model_garden(mod, shape, k):
  """Model Garden's `MoeLayer` at `shape`: experts-choose routing, capacity factor k·γ."""
  def make():
    experts = mod.FeedForwardExperts(shape["E"], shape["I"])
    router = mod.ExpertsChooseMaskedRouter(shape["E"], export_metrics=False)
    # Experts choose their top C = round(k·γ·T/E) tokens: the same E·C slots as our top-k.
    layer = mod.MoeLayer(experts, router, train_capacity_factor=k * shape["gamma"],
                         examples_per_group=1.0)
    return layer, lambda l, x: l(x, training=True)
  return make


def keras_hub(mod, shape, k):
  """Keras-Hub's `MixtralSparseMoeBlock` at `shape`, top-k, no auxiliary loss."""
  def make():
    layer = mod.MixtralSparseMoeBlock(shape["M"], shape["I"], shape["E"], top_k=k,
                                      router_aux_loss_coef=0.0)
    return layer, lambda l, x: l(x, training=True)[0]
  return make
