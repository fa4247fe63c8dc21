"""trainer/flower"""
