-- Databases of the two case studies, on one PostgreSQL server with wal_level=logical.
CREATE DATABASE warehouse_a;
CREATE DATABASE warehouse_b;
CREATE DATABASE store_web;
CREATE DATABASE store_app;
CREATE DATABASE inventory_central;
CREATE DATABASE core_banking;
CREATE DATABASE loan_management;
CREATE DATABASE credit_scoring;
CREATE DATABASE fraud_detection;
