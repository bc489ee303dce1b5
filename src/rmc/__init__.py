"""rmc: Runtime Masking and Cleansing (Wu, Yuan & Wu, ICML 2020), with defense-aware evaluation."""

__version__ = "0.1.0"
