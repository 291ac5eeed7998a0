"""maskedlm: pretrain transformer encoders with the masked-language-modelling objective.

    (θ̂, ω̂) = argmin_{θ,ω} Σ_{x∈D} Σ_{i∈A(x)} −log p_{θ,ω}(x_i | x̄)

The command line is `maskedlm` (cli.py); every command has a Python function behind it.
"""

__version__ = "0.1.0"
