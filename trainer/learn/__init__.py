"""trainer/learn"""
