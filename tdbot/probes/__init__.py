"""Probes that read a VM's activity from outside it, for idle_stop rules.

`tdbot.probes.ssh` logs in over SSH and reads nvidia-smi, the load average, network
counters and the process list. `tdbot.probes.hostkeys` keeps each VM's host key,
trusted on first use. The rule engine calls `tdbot.probes.hook` before it evaluates a
rule. Only `ssh` and `hostkeys` import asyncssh, so a daemon without SSH probes does
not load it.
"""
