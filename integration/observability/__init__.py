"""Metrics, traces and log formats: the families every part of MedBridge reports into (no MedBridge imports)."""
