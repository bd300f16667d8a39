"""Ray clusters: starting or joining one, and Ray Jobs for submitting work to it."""
