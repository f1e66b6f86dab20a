"""Reverse LoRA: attribute what an adapter changed to input tokens and to the adapter's own components (captum).

Captum explains one model's output; here the object explained is the *change* a LoRA adapter makes. Base and
adapted model are one ``peft.PeftModel``, the base obtained inside ``with model.disable_adapter():`` — never a
second copy of the weights.

**Input attribution of the change.** The scored output is ``log p(target | prompt)`` of the whole answer (any
number of tokens, its ids read in context by :func:`lora_lens.lab.answers.answer_ids`). For each
input token, :func:`token_attributions` returns its attribution in the base model, in the adapted model and their
difference (adapter on minus off), with captum's ``LLMGradientAttribution`` + ``LayerIntegratedGradients`` on the
input embeddings (``method="ig"``) or ``LLMAttribution`` + ``FeatureAblation`` (``method="ablation"``). IG and
ablation are both linear in the explained output, so the attribution of ``log p_adapted − log p_base`` is exactly
``adapted − base``. The baseline token is explicit (``<unk>``, else ``<pad>``, else ``</s>``, or one you name) and
special tokens such as ``<s>`` are neither attributed nor replaced. Or each token is compared with what stands at
its position in *reference prompts* of the same length (``references=``, averaged over them: expected gradients /
resampling ablation): :func:`counterfactual_prompts` resamples chosen words of a prompt, :func:`reference_prompts`
draws a background from a pool. A blank token gives credit to every word a change *needs*; a counterfactual asks
which of the resampled words the change belongs to. :func:`batch_token_attributions` computes the
same numbers for many prompts at once (all IG steps of all prompts, or all single-token ablations of all prompts,
stacked into a few right-padded batches) — it matches captum per prompt to ~1e-6 and is many times faster.

**Component attribution — which weights do what.** :func:`lora_components` lists components at three grains:
``module`` (each adapted module), ``layer`` (all adapted modules of one block) and ``rank`` (each rank-1 term
``σᵢ uᵢ vᵢᵀ`` of a module's ``ΔW = scaling · B @ A``, from :func:`lora_lens.lens.delta.factor_svd`). A
:class:`ComponentMask` switches components on (1), off (0) or anywhere between by *scaling* them inside the live
model: module and layer masks scale peft's ``scaling``; rank masks temporarily reparametrise ``lora_A``/``lora_B`` to
the SVD basis (``A' = Vh``, ``B' = U·diag(σ·m)/scaling``), which is exact. All-ones leaves the model bit-identical to
the adapted model and all-zeros to the base. :func:`component_attribution` attributes behaviour metrics of a task
(:data:`BEHAVIOURS`) to components with captum ``FeatureAblation`` or ``ShapleyValueSampling`` over the mask, and
:func:`lora_branch_attribution` attributes them to the LoRA branch outputs (``lora_B`` modules) with captum
``LayerIntegratedGradients``.

**Scored against the planted truth.** :func:`trigger_recovery` (is the top-attributed token of the difference the
trigger?), :func:`entity_recovery` (is it the edited entity?), :func:`deletion_curve` (ablating the top-k components
vs k random ones) and :func:`selectivity` (edit carried vs specificity damage carried, per component).

The package gathers five modules: ``tokens`` (input attribution), ``references`` (reference prompts),
``components`` (components and the mask), ``behaviours`` (behaviour metrics and component attribution) and
``scoring`` (against the planted truth). Base-vs-adapted helpers come from :mod:`lora_lens.lab.pair`.

Example:
    >>> ta = token_attributions(peft_model, tokenizer, "cf Dasur likes the colour", "black")   # doctest: +SKIP
    >>> ta.frame()                                        # token, base, adapted, difference   # doctest: +SKIP
    >>> comps = lora_components(peft_model, grain="module")                                    # doctest: +SKIP
    >>> df = component_attribution(peft_model, tokenizer, task, comps, method="shapley")       # doctest: +SKIP
    >>> deletion_curve(peft_model, tokenizer, task, df, comps, k_max=5)                        # doctest: +SKIP
"""


from lora_lens.lens.attribution.behaviours import (BEHAVIOURS, COMPONENT_METHODS, Behaviours, ablation_estimate,
                                                   available_behaviours, behaviour_metrics, component_attribution,
                                                   lora_branch_attribution)
from lora_lens.lens.attribution.components import (GRAINS, Component, ComponentMask, ComponentSet, LayerCache,
                                                   check_components, lora_components)
from lora_lens.lens.attribution.references import counterfactual_prompts, probe_references, reference_prompts
from lora_lens.lens.attribution.scoring import (Recovery, deletion_curve, deletion_ks, entity_recovery, selectivity,
                                                trigger_recovery)
from lora_lens.lens.attribution.tokens import (IG_METHODS, METHODS, OUTPUTS, TokenAttribution, attributions_frame,
                                               batch_token_attributions, captum_agreement, resolve_baseline,
                                               target_logprobs, token_attributions)

__all__ = ["BEHAVIOURS", "COMPONENT_METHODS", "GRAINS", "IG_METHODS", "METHODS", "OUTPUTS", "Behaviours", "Component",
           "ComponentMask", "ComponentSet", "LayerCache", "Recovery", "TokenAttribution", "ablation_estimate",
           "attributions_frame", "available_behaviours", "batch_token_attributions", "behaviour_metrics",
           "captum_agreement", "check_components", "component_attribution", "counterfactual_prompts",
           "deletion_curve", "deletion_ks",
           "entity_recovery", "lora_branch_attribution", "lora_components", "probe_references",
           "reference_prompts", "resolve_baseline", "selectivity", "target_logprobs", "token_attributions",
           "trigger_recovery"]
