import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from retro_peft.domains.mixed_lora import MixedLoRA


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config).eval()
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    # init_lora_weights=False: random A and B, so every adapter really changes the output.
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    model.add_adapter("c", LoraConfig(r=2, lora_alpha=2, target_modules=targets[:2], init_lora_weights=False))
    return model.eval()


def test_mixed_batch_matches_peft_mixed_forward(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (5, 7))
    rows = ["a", "b", None, "c", "a"]
    with torch.no_grad():
        reference = model(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
        mixed = MixedLoRA(model)
        with mixed.batch(rows):
            fast = model(input_ids=ids).logits
        after = model(input_ids=ids, adapter_names=["a"] * 5).logits
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    # outside the context the layers are PEFT's again
    torch.testing.assert_close(after[0], reference[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reference[0], reference[1])  # the adapters differ


def test_supports_plain_lora_only(model):
    mixed = MixedLoRA(model)
    assert mixed.supports("a") and not mixed.supports("missing")
