"""Offline measurement of MedBridge's knowledge and drafting quality (``medbridge eval`` and bench/).

``openi`` reads the Open-i chest X-ray reports that the ``torchxrayvision`` package ships as
data; ``retrieval`` measures recall@k of BM25, dense and fused retrieval; ``drafting`` measures impression
drafting and citation grounding. Kept light: nothing heavy is imported here.
"""
