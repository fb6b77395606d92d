"""The compute of lola-chat: PyTorch references (the specification) and fast kernels."""
