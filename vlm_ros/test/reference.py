"""
transformers on PyTorch as the reference the engine is checked against (tests only).

One class for every family: the model's own processor renders the chat template, tiles the
images and tokenizes; the PyTorch model gives first-step logits, image features and greedy
or beam ``generate`` output. Images and earlier turns are laid out as the engine lays them
out: the images first in the last user turn, history as plain text turns before it. torch
and transformers are imported on first use, so test modules can import this one before they
skip for want of torch.
"""


class Reference:
    """transformers' processor and model for one tiny model directory."""

    def __init__(self, model_dir, model_class, load_processor, max_new_tokens=32):
        import transformers
        self.processor = load_processor(model_dir)
        self.model = getattr(transformers, model_class).from_pretrained(model_dir).eval()
        self.config = self.model.config
        self.max_new_tokens = max_new_tokens
        eos = self.model.generation_config.eos_token_id
        self.eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def messages(self, num_images, prompt, system='', history=()):
        """Build a conversation in transformers' content-list form."""
        messages = []
        if system:
            messages.append({'role': 'system', 'content': [{'type': 'text', 'text': system}]})
        for i, turn in enumerate(history):
            text, count = (turn, 0) if isinstance(turn, str) else \
                (turn['text'], len(turn.get('images', ())))
            messages.append({'role': 'user' if i % 2 == 0 else 'assistant',
                             'content': [{'type': 'image'}] * count
                             + [{'type': 'text', 'text': text}]})
        content = [{'type': 'image'}] * num_images + [{'type': 'text', 'text': prompt}]
        messages.append({'role': 'user', 'content': content})
        return messages

    def text(self, num_images, prompt, system='', history=()):
        """Render the chat template as the processor does."""
        return self.processor.apply_chat_template(
            self.messages(int(num_images), prompt, system, history), add_generation_prompt=True)

    def inputs(self, images, prompt, system='', history=(), **processor_kwargs):
        """
        Return the processor's tensors for ``images`` (None, one, or a list) and text.

        A history turn may be ``{'text': ..., 'images': [...]}``; its images come first.
        """
        images = [] if images is None else images if isinstance(images, list) else [images]
        shown = [i for t in history if isinstance(t, dict) for i in t.get('images', ())]
        return self.processor(text=self.text(len(images), prompt, system, history),
                              images=(shown + images) or None, return_tensors='pt',
                              **processor_kwargs)

    def generate(self, inputs, **kwargs):
        """Return the generated ids (greedy unless ``kwargs`` say otherwise)."""
        import torch
        kwargs.setdefault('max_new_tokens', self.max_new_tokens)
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False, **kwargs)
        return out[0, inputs['input_ids'].shape[1]:].tolist()

    def first_logits(self, inputs):
        """Return the logits after the prompt, float32 [vocab]."""
        import torch
        with torch.no_grad():
            return self.model(**inputs).logits[0, -1].numpy()

    def check(self, pipe, images, prompt, history=()):
        """Assert that ``pipe`` lays out and answers as the reference does (greedy, exact)."""
        import numpy as np
        inputs = self.inputs(images, prompt, history=history)
        ours = pipe.family.prepare(images, prompt, history=history)
        assert ours.input_ids.tolist() == inputs['input_ids'][0].tolist()
        pixels = inputs['pixel_values'].numpy()
        assert np.abs(ours.vision_inputs['pixel_values'] - pixels).max() <= 1e-4
        assert pipe.generate(images, prompt, history=history).token_ids == \
            self.generate(inputs)
