"""Offline measurement of MedBridge's knowledge and drafting quality (``medbridge eval``).

``openi_reports`` reads the Open-i chest X-ray reports that the ``torchxrayvision`` package ships as data;
``drafting`` measures impression drafting and citation grounding on them. Kept light: nothing heavy is
imported here.
"""
