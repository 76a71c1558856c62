"""The bridge between blues_torch and blues_jax: conversion and the checks that prove parity."""
