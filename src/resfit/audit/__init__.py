"""The data audit: copies, leakage, label conflicts, likely label errors and outliers (see run.py)."""

from .run import AUDIT_FILE, SHEET_FILE, AuditConfig, AuditReport, audit

__all__ = ["AUDIT_FILE", "SHEET_FILE", "AuditConfig", "AuditReport", "audit"]
