"""Sentences the MiniLM tests embed (tests/shared/test_minilm.py all of them, the SDK's
tests/user_client/test_embed.py a few): short and long, questions, code, punctuation, other
scripts, emoji, stray spaces, mixed case."""

SENTENCES = [
    "Hello!",
    "The cat sat on the mat.",
    "A man is playing a guitar on stage.",
    "Permutations hide the weights from the cloud, and the data from everyone but the user.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "I can't believe it's already December — where did the year go?",
    "The quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates by 0.75%.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Ok",
    "She sells sea shells by the sea shore.",
    "The mitochondria is the powerhouse of the cell.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon, followed by Buzz Aldrin.",
    "Je pense, donc je suis.",
    "Das ist ein Satz auf Deutsch, der nicht sehr lang ist.",
    "東京は日本の首都です。",
    "Emoji test: 🚀🔥 launch day!",
    "Please reset my password; I no longer have access to the e-mail address on file.",
    "A transformer block applies self-attention, then a position-wise feed-forward network, "
    "each followed by a residual connection and layer normalisation.",
    "Two dogs are running through a snowy field.",
    "A child is riding a horse.",
    "The weather forecast predicts heavy rain, strong winds and possible flooding along the coast "
    "through the weekend, so residents are advised to stay indoors.",
    "Why?",
    "GPUs accelerate matrix multiplication, which dominates the cost of neural network inference.",
    "The recipe calls for two cups of flour, one egg, a pinch of salt and 250 ml of milk.",
    'He said: "I\'ll be there at 5 p.m." — but he never showed up.',
    "Quantum entanglement links the states of particles regardless of the distance between them, "
    "a phenomenon Einstein famously called spooky action at a distance.",
    "   leading and trailing spaces   ",
    "UPPER CASE AND lower case should embed alike for an uncased model.",
]
