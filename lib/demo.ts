export async function runDemo(_o: { json: boolean }): Promise<number> { return 0; }
