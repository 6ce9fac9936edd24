"""Layer 1, used by every other: errors, atomic writes, JSON lines, safe YAML, logging, devices, media
files, schedules, package folders. Imports nothing of sdsbridge above it.
"""
