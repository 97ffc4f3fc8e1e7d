"""Codec chains: compress tensors on one side, expand them on the other.

``codec`` holds the ``Codec`` a plugin implements; ``chain`` the ``CodecChain`` a
job's ``[compression]`` table is parsed into, once, and everything that runs it.
"""
