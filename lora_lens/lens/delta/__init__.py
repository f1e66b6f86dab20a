"""Weight space: what a LoRA adapter changed, read from its low-rank factors.

For every module a LoRA adapter touches, ``lora_modules`` extracts the factors ``B`` (out×r) and ``A`` (r×in), the
scaling (``alpha/r``, or ``alpha/√r`` with rsLoRA, read from the layer itself) and the base weight ``W``, all in the
``[out, in]`` orientation of ``nn.Linear`` — GPT-2's ``Conv1D`` stores ``W`` as ``[in, out]`` (peft's
``fan_in_fan_out``); it is transposed here, so ``W`` and ``ΔW = scaling · B @ A`` always line up.

From there:

* :func:`factor_svd` — the exact singular triplets of ``ΔW`` from the factors (QR of ``B`` and ``Aᵀ``, then an r×r
  SVD), never forming or decomposing the dense matrix.
* :func:`summary` — one row per module: ‖ΔW‖_F, ‖ΔW‖₂ (absolute and relative to ‖W‖), singular values, effective
  rank, stable rank, amplification factor and intruder dimensions; :func:`energy_by` aggregates the share of update
  energy (‖ΔW‖_F²) per layer, relative-depth bin or module type.
* :func:`phi` / :func:`phi_grid` / :func:`phi_table` — subspace similarity between two adapters (Hu et al. 2021, §7);
  :func:`random_phi` — its Monte Carlo null, two random adapters of the same shapes and ranks.
* :func:`amplification_factor` / :func:`amplification` — ‖ΔW‖_F / ‖UᵀWVᵀ‖_F (Hu et al. 2021, Table 7).
* :func:`intruder_dimensions` — singular vectors of W+ΔW unlike all of W's (Shuttleworth et al. 2024).
* :func:`random_like` / :func:`random_lora_ranks` / :func:`marchenko_pastur_ranks` — the random-matrix null: a
  random adapter of the same shapes and norm, the sampled ranks of a random rank-r product, their MP limit.
* :func:`read_directions` / :func:`directions_table` — singular directions read as vocabulary: write-side modules
  (attention output, MLP down) through the final norm and the unembedding, read-side modules (q/k/v, gate/up)
  through the embedding.

Everything is computed in float32 without autograd, on ``device`` (CPU by default). The namespace gathers four
modules: ``factors`` (extraction, exact SVD, ranks), ``spectra`` (one adapter's tables), ``subspace`` (two
adapters compared) and ``directions`` (singular directions as words). Module types and layer indices come from
:mod:`lora_lens.lab.modules`.

Limitations:
    * **DoRA**: ``ΔW`` here is ``scaling · B @ A`` only; the magnitude vector that DoRA applies after normalising the
      columns of ``W + ΔW`` is ignored (rows are flagged ``dora=True`` and a warning is issued).
    * LoRA biases (``lora_bias=True``) and non-linear-layer LoRA (Conv2d …) are not part of ``ΔW``; convolution
      layers are skipped with a warning. LoRA on an embedding is supported: its ``[out, in]`` orientation is
      ``[hidden, vocab]`` (the embedding as a linear map of one-hot inputs).
    * A merged adapter is handled (its ΔW is subtracted from the stored weight to recover ``W``); any *other* merged
      adapter stays part of ``W``.

Example:
    >>> from peft import LoraConfig, get_peft_model                                    # doctest: +SKIP
    >>> pm = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))        # doctest: +SKIP
    >>> df = summary(pm)                                                                # doctest: +SKIP
    >>> energy_by(df, "module_type")                                                    # doctest: +SKIP
"""


from lora_lens.lens.delta.directions import Direction, directions_table, final_norm, read_directions
from lora_lens.lens.delta.factors import (DTYPE, ModuleDelta, effective_rank, factor_svd, lora_modules, module_deltas,
                                          select_module, stable_rank)
from lora_lens.lens.delta.spectra import (Intruders, RankNull, amplification, amplification_factor, energy_by,
                                          intruder_dimensions, marchenko_pastur_ranks, random_like, random_lora_ranks,
                                          summary)
from lora_lens.lens.delta.subspace import SIDES, phi, phi_grid, phi_table, random_phi

__all__ = ["DTYPE", "SIDES", "Direction", "Intruders", "ModuleDelta", "RankNull", "amplification",
           "amplification_factor", "directions_table", "effective_rank", "energy_by", "factor_svd", "final_norm",
           "intruder_dimensions", "lora_modules", "marchenko_pastur_ranks", "module_deltas", "phi", "phi_grid",
           "phi_table", "random_like", "random_lora_ranks", "random_phi", "read_directions", "select_module",
           "stable_rank", "summary"]
