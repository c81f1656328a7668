"""radmark: radioactive data marking and detection (Sablayrolles et al., ICML 2020)."""

__version__ = "0.1.0"
