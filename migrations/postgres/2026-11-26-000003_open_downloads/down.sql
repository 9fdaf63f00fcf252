DROP INDEX applications_one_open;
DROP TABLE open_downloads;
