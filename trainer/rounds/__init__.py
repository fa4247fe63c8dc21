"""trainer/rounds"""
