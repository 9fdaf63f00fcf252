DROP TABLE open_downloads;
