"""The model Parley ships: it loads by name and makes small talk."""
import engine
from engine.generate import generate
from engine.registry import resolve_model
from engine.settings import Settings


def test_default_model_answers_small_talk():
    path = resolve_model(None)
    assert path.name == "default-model"
    lm = engine.load(path, device="cpu")
    assert lm.num_parameters() < 25e6 / 4
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "hi! how are you doing today?"}])
    reply = generate(lm, prompt, Settings(temperature=0, max_new_tokens=40))[0]
    assert reply.finish_reason == "eos"
    assert "doing" in reply.text and "?" in reply.text   # "I am doing well, how are you?"
