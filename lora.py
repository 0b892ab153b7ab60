"""
LoRA (Hu et al. 2021) on the attention and MLP matrices of model.py's GPT, through the peft library, merged back into
plain weights so that a LoRA-fine-tuned checkpoint is like any other.

    model = add_lora(model, rank=8, alpha=16)   # the GPT's own weights frozen; B = 0: the model is unchanged
    ... train the parameters that require grad ...
    merged_state_dict(model)                    # W + (alpha / rank) B A for every adapted matrix: a GPT state dict
"""
import copy

MATRICES = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')


def add_lora(model, rank, alpha):
    from peft import LoraConfig, get_peft_model  # here: peft imports transformers, seconds that only LoRA runs need
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(MATRICES)))


def merged_state_dict(model):
    """The GPT state dict with the adapters merged in, computed on a copy (the training model keeps its adapters,
    so merging never perturbs the weights a resumed run continues from)."""
    return copy.deepcopy(model).merge_and_unload().state_dict()


def adapter_state(model):
    """The trained adapter tensors (what a resumed run needs beside the base checkpoint)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model, state):
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        params[name].data.copy_(tensor)
