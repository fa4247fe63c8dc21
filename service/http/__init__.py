"""service/http"""
