CREATE TABLE products (
    id int PRIMARY KEY,
    name text NOT NULL,
    price numeric(10,2),
    tags text[],
    attrs jsonb,
    updated_at timestamptz DEFAULT now()
);
INSERT INTO products (id, name, price, tags) VALUES (1, 'pen', 1.50, '{office}'), (2, 'ink', 12.00, '{office,refill}');
